#!/usr/bin/env bash
# Quality of evolving-attention settings against vanilla fairseq on Multi30k De-En,
# with the quickstart's recipe (scripts/train.sh multi30k: d=128, 650 updates on CPU):
# the evidence behind the --ea-alpha / --ea-beta defaults. Prints a table (sacreBLEU per
# seed and their mean) and writes results/multi30k_sweep.json. About 10 minutes per
# setting and seed on 2 cores. Speed is not measured here (see benchmarks/cost.py).
#
#   bash benchmarks/multi30k_sweep.sh                         # every setting, seed 1
#   SEEDS="1 2" ONLY="vanilla|ea-a0.5-b0.5" bash benchmarks/multi30k_sweep.sh
#
# SEEDS: training seeds; ONLY: a regular expression on setting names (all);
# OUT: results folder (results/); SWEEP_DIR: checkpoints (checkpoints/multi30k_sweep).
# A finished run (its eval/test.json exists) is not run again; the table lists every
# finished run of the settings.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
EA_STEP=multi30k-sweep
OUT=${OUT:-$EA_REPO/results}
SWEEP_DIR=${SWEEP_DIR:-$EA_REPO/checkpoints/multi30k_sweep}
DEFAULT_SETTINGS=(
  "vanilla|vanilla|"
  "ea-a0.5-b0.5|ea|--ea-alpha 0.5 --ea-beta 0.5"
  "ea-a0.5-b0.2|ea|--ea-alpha 0.5 --ea-beta 0.2"
  "ea-a0.5-b0.8|ea|--ea-alpha 0.5 --ea-beta 0.8"
  "ea-a0.5-b0.5-cross|ea|--ea-alpha 0.5 --ea-beta 0.5 --ea-cross-attn"
)
ea_activate_env
bash "$EA_REPO/scripts/prepare-multi30k.sh"
mkdir -p "$OUT"
for entry in "${DEFAULT_SETTINGS[@]}"; do
  IFS='|' read -r name model extra <<<"$entry"
  [[ "$name" =~ ^(${ONLY:-.*})$ ]] || continue
  for seed in ${SEEDS:-1}; do
    run=$name/seed$seed
    save="$SWEEP_DIR/$run"
    [[ -f "$save/eval/test.json" ]] && continue
    mkdir -p "$save"
    log "$run: MODEL=$model $extra"
    MODEL=$model SAVE_DIR=$save SEED=$seed CPU=1 EXTRA_ARGS=$extra bash "$EA_REPO/scripts/train.sh" multi30k \
      >"$save.log" 2>&1 || die "training $run failed (log: $save.log)"
    MODEL=$model SAVE_DIR=$save CPU=1 bash "$EA_REPO/scripts/evaluate.sh" multi30k >>"$save.log" 2>&1 \
      || die "evaluating $run failed (log: $save.log)"
  done
done
"$PYTHON" - "$SWEEP_DIR" "$OUT/multi30k_sweep.json" "${DEFAULT_SETTINGS[@]}" <<'PY'
import glob, json, os, re, statistics, sys
sweep, out, entries = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for entry in entries:
    name, model, extra = entry.split("|")
    runs = []
    for path in sorted(glob.glob(f"{sweep}/{name}/seed*/eval/test.json")):
        res = json.load(open(path))
        run_dir = os.path.dirname(os.path.dirname(path))
        valid = re.findall(r"valid on 'valid' subset \| loss [\d.]+ \| nll_loss ([\d.]+)",
                           open(f"{run_dir}/train.log").read())
        runs.append({"seed": int(run_dir.rsplit("seed", 1)[1]), "sacrebleu": res["sacrebleu"],
                     "tokenized_bleu": res["tokenized_bleu"], "valid_nll_last": float(valid[-1]),
                     "signature": res["sacrebleu_signature"]})
    if runs:
        rows.append({"setting": name, "model": model, "args": extra, "runs": runs,
                     "sacrebleu_mean": round(statistics.mean(r["sacrebleu"] for r in runs), 2)})
json.dump(rows, open(out, "w"), indent=2)
print(f"\n{'setting':<22} {'seeds':>5} {'valid nll':>9} {'sacreBLEU per seed':<20} {'mean':>6}")
for r in rows:
    per = " ".join(f"{x['sacrebleu']:.2f}" for x in r["runs"])
    nll = statistics.mean(x["valid_nll_last"] for x in r["runs"])
    print(f"{r['setting']:<22} {len(r['runs']):>5} {nll:>9.3f} {per:<20} {r['sacrebleu_mean']:>6.2f}")
print(f"\n({rows[0]['runs'][0]['signature']}; Multi30k test_2016_flickr, lowercased)" if rows else "")
PY
