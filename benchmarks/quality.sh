#!/usr/bin/env bash
# Quality of evolving attention against vanilla fairseq, trained to convergence:
# for a corpus, train every setting with several seeds using the same recipe
# (scripts/train.sh's small CPU model, early stopping on valid loss with fairseq's
# --patience), average the last epoch checkpoints and decode the test set with beam 5
# (scripts/evaluate.sh), then write results/<corpus>.json (per-run BLEU, sacreBLEU +
# signature, chrF, updates and wall time to convergence; per setting mean, std and a
# paired bootstrap test against vanilla, or against the EA defaults in the sweep) and
# results/<corpus>.png (learning curves), with
# benchmarks/quality_report.py.
#
#   bash benchmarks/quality.sh multi30k10k             # vanilla, ea, ea-cross x seeds 1 2 3
#   bash benchmarks/quality.sh europarl8k              # the same on Europarl Fr-En
#   MODE=sweep bash benchmarks/quality.sh multi30k10k  # alpha, beta, kernel, activation, conv decay
#                                                      # -> results/multi30k10k_defaults.{json,png}
#   bash benchmarks/quality.sh multi30k10k --report    # only (re)write the results from finished runs
#   bash benchmarks/quality.sh tatoeba --runs-only     # train and evaluate, no results file (benchmarks/scale.py's
#                                                      # runner calls it so, one run at a time)
#
# Corpora (prepared with the project's recipes if needed):
#   multi30k10k  the converged runs in results/: Multi30k De-En, the first 10,000 training
#                pairs, joint BPE 2k, a d=64 model with 2+2 layers (SMALL_MODEL below),
#                at most 120 epochs: one run converges in 10-35 minutes on 2 CPU cores
#   europarl8k   the same sizes on Europarl v7 Fr-En: the first 8,000 training lines
#                (scripts/prepare-wmt-small.sh fr-en, in-domain valid/test of 1,000)
#   multi30k     all of Multi30k De-En with the quickstart's d=128, 3+3 model (hours per run)
#   tatoeba      Tatoeba De-En, cased (scripts/prepare-tatoeba.sh): 161,810 training pairs, the same model
#   europarl20k  Europarl v7 Fr-En, 18k training lines (scripts/prepare-wmt-small.sh fr-en)
#   wmt10k       WMT En-De, 10k pairs (scripts/prepare-wmt-small.sh en-de)
#
# Idempotent and resumable: a run whose eval/test.json exists is skipped; an interrupted
# run continues from its checkpoint_last.pt; a run that finished training (TRAINED
# marker) is only evaluated. The report covers every finished run of the mode's settings.
#
# Variables (all optional):
#   MODE         main | sweep | scale (vanilla, ea, residual = --ea-alpha 0, ea-cross: the arms of
#                benchmarks/scale.py's grid)                                    (main)
#   SEEDS        training seeds                                 (main: 1 2 3; sweep: 1)
#   ONLY         a regular expression on setting names                          (all)
#   PATIENCE     epochs without a better valid loss before stopping (--patience)  (3)
#   MAX_UPDATE   cap on updates, should patience not stop a run first          (30000)
#   MAX_EPOCH    cap on epochs                       (multi30k10k, europarl8k: 120; none)
#   NUM_AVG      last epoch checkpoints averaged for decoding (<= 5, the recipe keeps 5) (3)
#   MODEL_ARGS   fairseq-train arguments for every run (model size; multi30k10k and
#                europarl8k: SMALL_MODEL; otherwise empty, the recipe's d=128, 3+3 layers,
#                4 heads, FFN 512)
#   DATA_BIN     the prepared corpus                           (data-bin/<corpus's folder>)
#   NAME         name of the results and run folders, e.g. for a subset in DATA_BIN (<corpus>)
#   RUNS_DIR     run folders: RUNS_DIR/<setting>/seed<N>/      (checkpoints/quality/<NAME>)
#   OUT          results folder                                                 (results)
#   PRUNE        1: after evaluation delete the epoch checkpoints and checkpoint_last.pt
#                (the averaged model in eval/ and checkpoint_best.pt stay)        (1)
#   PAIRED_BS_N  bootstrap resamples of the paired test                          (1000)
#   and those of scripts/train.sh / evaluate.sh (CPU, LR, WARMUP, DROPOUT, MAX_TOKENS, ...)
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"

CORPUS=${1:-}
REPORT_ONLY=0 RUNS_ONLY=0
case "${2:-}" in
  "") ;;
  --report) REPORT_ONLY=1 ;;
  --runs-only) RUNS_ONLY=1 ;;
  *) die "unknown argument '$2' (expected --report or --runs-only)" ;;
esac
EA_STEP=quality-$CORPUS
# the model of the CPU-sized presets: small enough that a run converges within the hour
SMALL_MODEL="--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 64 --decoder-embed-dim 64"
SMALL_MODEL+=" --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256"
PREPARE_ENV=()  # variables of the preparation recipe
BENCH=multi30k  # scripts/train.sh's and evaluate.sh's recipe (the small CPU one)
case "$CORPUS" in
  multi30k) DATA_DIR=multi30k.de-en PREPARE=(prepare-multi30k.sh) ;;
  tatoeba) DATA_DIR=tatoeba.de-en PREPARE=(prepare-tatoeba.sh) BENCH=tatoeba ;;
  europarl20k) DATA_DIR=europarl20k.fr-en PREPARE=(prepare-wmt-small.sh fr-en) ;;
  wmt10k) DATA_DIR=wmt10k.en-de PREPARE=(prepare-wmt-small.sh en-de) ;;
  multi30k10k | europarl8k)
    if [[ "$CORPUS" == multi30k10k ]]; then
      DATA_DIR=multi30k10k.de-en PREPARE=(prepare-multi30k.sh) LINES=10000
    else
      DATA_DIR=europarl8k.fr-en PREPARE=(prepare-wmt-small.sh fr-en) LINES=8000
    fi
    PREPARE_ENV=(TRAIN_LINES="$LINES" BPE_TOKENS=2000 WORK="${WORK:-$EA_REPO/work/$DATA_DIR}")
    : "${MODEL_ARGS=$SMALL_MODEL}" "${MAX_EPOCH:=120}"
    ;;
  *) die "usage: quality.sh multi30k10k|europarl8k|multi30k|tatoeba|europarl20k|wmt10k [--report|--runs-only] (got '$CORPUS')" ;;
esac
MODE=${MODE:-main}
# name|model|fairseq-train arguments of the setting
case "$MODE" in
  main)
    SEEDS=${SEEDS:-1 2 3}
    SETTINGS=(
      "vanilla|vanilla|"
      "ea|ea|"
      "ea-cross|ea|--ea-cross-attn"
    )
    REPORT_NAME=${NAME:-$CORPUS}
    BASELINE=vanilla
    ;;
  sweep)
    SEEDS=${SEEDS:-1}
    SETTINGS=(
      "vanilla|vanilla|"
      "ea|ea|"
      "alpha0.2|ea|--ea-alpha 0.2"
      "alpha0.8|ea|--ea-alpha 0.8"
      "alpha1.0|ea|--ea-alpha 1.0"
      "beta0.2|ea|--ea-beta 0.2"
      "beta0.8|ea|--ea-beta 0.8"
      "kernel1|ea|--ea-kernel-size 1"
      "kernel5|ea|--ea-kernel-size 5"
      "relu|ea|--ea-activation relu"
      "leaky_relu|ea|--ea-activation leaky_relu"
      "conv-no-wd|ea|--optimizer ea_adam --ea-conv-no-weight-decay"
    )
    REPORT_NAME=${NAME:-$CORPUS}_defaults
    BASELINE=ea  # the question is whether a default should change
    ;;
  scale)
    SEEDS=${SEEDS:-1 2}
    SETTINGS=(
      "vanilla|vanilla|"
      "ea|ea|"
      "residual|ea|--ea-alpha 0"
      "ea-cross|ea|--ea-cross-attn"
    )
    REPORT_NAME=${NAME:-$CORPUS}_scale
    BASELINE=vanilla
    ;;
  *) die "MODE=$MODE: expected main, sweep or scale" ;;
esac
PATIENCE=${PATIENCE:-3}
NUM_AVG=${NUM_AVG:-3}
PRUNE=${PRUNE:-1}
export CPU=${CPU:-1} MAX_UPDATE=${MAX_UPDATE:-30000} NUM_AVG
[[ -z "${MAX_EPOCH:-}" ]] || export MAX_EPOCH
DATA_BIN=${DATA_BIN:-$EA_REPO/data-bin/$DATA_DIR}
export DATA_BIN
RUNS_DIR=${RUNS_DIR:-$EA_REPO/checkpoints/quality/${NAME:-$CORPUS}}
OUT=${OUT:-$EA_REPO/results}
[[ "$PATIENCE" =~ ^[1-9][0-9]*$ ]] || die "PATIENCE=$PATIENCE: expected a positive number of epochs"
[[ -z "${NAME:-}" || "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "NAME=$NAME: expected letters, digits, '.', '_' or '-'"
[[ "$NUM_AVG" =~ ^[1-5]$ ]] || die "NUM_AVG=$NUM_AVG: expected 1..5 (the recipe keeps the last 5 epoch checkpoints)"

ea_activate_env
require_python_module matplotlib "pip install matplotlib (scripts/install.sh does)"

if [[ "$REPORT_ONLY" == 0 ]]; then
  [[ -f "$DATA_BIN/PREPARED" ]] \
    || env DEST="$DATA_BIN" "${PREPARE_ENV[@]}" bash "$EA_REPO/scripts/${PREPARE[0]}" "${PREPARE[@]:1}"
  for entry in "${SETTINGS[@]}"; do
    IFS='|' read -r name model args <<<"$entry"
    [[ "$name" =~ ^(${ONLY:-.*})$ ]] || continue
    for seed in $SEEDS; do
      run=$RUNS_DIR/$name/seed$seed
      [[ -f "$run/eval/test.json" ]] && continue
      mkdir -p "$run"
      if [[ ! -f "$run/TRAINED" ]]; then
        log "$name seed $seed: training (MODEL=$model ${args:-(defaults)}; log: $run/run.log)"
        "$PYTHON" - "$run/run.json" "$CORPUS" "$name" "$model" "$seed" "$args" "${MODEL_ARGS:-}" \
          "$PATIENCE" "$DATA_BIN" "$NUM_AVG" "$MAX_UPDATE" "${MAX_EPOCH:-}" <<'PY'
import json, os, platform, sys, time
path, corpus, name, model, seed, args, model_args, patience, data_bin, num_avg, max_update, max_epoch = sys.argv[1:]
# what else shapes the run: train.sh's recipe variables as given (unset: its defaults), threads
given = {k: os.environ[k] for k in ("LR", "WARMUP", "DROPOUT", "MAX_TOKENS", "UPDATE_FREQ", "OMP_NUM_THREADS",
                                    "MKL_NUM_THREADS", "SCALE_JOBS") if os.environ.get(k)}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()) \
    if os.path.exists("/proc/cpuinfo") else platform.processor()
info = {"corpus": corpus, "setting": name, "model": model, "seed": int(seed), "args": args,
        "model_args": model_args, "patience": int(patience), "data_bin": data_bin, "num_avg": int(num_avg),
        "max_update": int(max_update), "max_epoch": int(max_epoch) if max_epoch else None,
        "cpu": cpu, "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "train_env": given, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
if os.path.exists(path):  # a resumed run keeps its first start
    info["started"] = json.load(open(path)).get("started", info["started"])
json.dump(info, open(path, "w"), indent=2)
PY
        start=$(date +%s)
        MODEL=$model SAVE_DIR=$run SEED=$seed LOG_FORMAT=simple \
          EXTRA_ARGS="${MODEL_ARGS:-} --patience $PATIENCE $args" \
          bash "$EA_REPO/scripts/train.sh" "$BENCH" >>"$run/run.log" 2>&1 \
          || die "training $name seed $seed failed (log: $run/run.log)"
        # seconds of each training invocation (a resumed run has several)
        echo $(($(date +%s) - start)) >>"$run/train_seconds"
        : >"$run/TRAINED"
      fi
      log "$name seed $seed: evaluating"
      MODEL=$model SAVE_DIR=$run bash "$EA_REPO/scripts/evaluate.sh" "$BENCH" >>"$run/run.log" 2>&1 \
        || die "evaluating $name seed $seed failed (log: $run/run.log)"
      if [[ "$PRUNE" == 1 ]]; then
        find "$run" -maxdepth 1 \( -regex '.*/checkpoint[0-9]+\.pt' -o -name checkpoint_last.pt \) -delete
      fi
    done
  done
fi

[[ "$RUNS_ONLY" == 0 ]] || exit 0
mkdir -p "$OUT"
"$PYTHON" "$EA_REPO/benchmarks/quality_report.py" --runs "$RUNS_DIR" --corpus "${NAME:-$CORPUS}" --data-bin "$DATA_BIN" \
  --json "$OUT/$REPORT_NAME.json" --png "$OUT/$REPORT_NAME.png" --paired-bs-n "${PAIRED_BS_N:-1000}" \
  --baseline "$BASELINE" \
  --meta "train=scripts/train.sh $BENCH (its small CPU recipe) on data_bin, + --patience" \
  "evaluate=scripts/evaluate.sh $BENCH (beam 5, lenpen 1, last num_avg epochs averaged)" "mode=$MODE" \
  --settings "${SETTINGS[@]}"
