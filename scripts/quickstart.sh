#!/usr/bin/env bash
# The whole pipeline on a small real corpus, on a CPU: install (if needed), get
# Multi30k De-En, prepare it with the same code as the big recipes, train a small
# evolving-attention Transformer, decode the test set with beam 5, and print BLEU and
# a few translations.
#
#   bash scripts/quickstart.sh
#
# Variables (all optional): MULTI30K_DIR (a local copy of the Multi30k .gz files;
# otherwise they are downloaded), MODEL (ea | vanilla), MAX_UPDATE (training length),
# SAVE_DIR, RESULTS_JSON (also write the score, signature, updates and times there, as
# results/quickstart.json holds them), and those of the scripts it calls
# (prepare-multi30k.sh, train.sh, evaluate.sh).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
EA_STEP=quickstart
SCRIPTS=$EA_REPO/scripts
MODEL=${MODEL:-ea}
export MODEL
export SAVE_DIR=${SAVE_DIR:-$EA_REPO/checkpoints/quickstart/$MODEL}
export CPU=${CPU:-1}
export DATA_BIN=${DATA_BIN:-${DEST:-$EA_REPO/data-bin/multi30k.de-en}}
start=$(date +%s)

log "1/4 install"
bash "$SCRIPTS/install.sh"
ea_activate_env

log "2/4 data: Multi30k De-En"
bash "$SCRIPTS/prepare-multi30k.sh"

log "3/4 training a small $MODEL model on the CPU (checkpoints: $SAVE_DIR)"
train_start=$(date +%s)
bash "$SCRIPTS/train.sh" multi30k
train_s=$(($(date +%s) - train_start))

log "4/4 decoding the test set (beam 5) and scoring"
bash "$SCRIPTS/evaluate.sh" multi30k

"$PYTHON" - "$SAVE_DIR/eval/test.json" "$SAVE_DIR/eval/test.gen" "$DATA_BIN" "$SAVE_DIR/eval/test.detok.en" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
data = sys.argv[3]
refs = open(f"{data}/test.raw.en", encoding="utf-8").read().splitlines()
hyps = open(sys.argv[4], encoding="utf-8").read().splitlines()
sources = {}
for line in open(sys.argv[2], encoding="utf-8"):
    if line.startswith("S-"):
        head, text = line.rstrip("\n").split("\t", 1)
        sources[int(head[2:])] = text
print()
print("Example translations (test_2016_flickr, lowercased):")
for i in (0, 10, 100, 500, 999):
    if i < len(hyps):
        print(f"  source:     {sources.get(i, '?').replace('@@ ', '')}")
        print(f"  reference:  {refs[i]}")
        print(f"  model:      {hyps[i]}")
        print()
print(f"BLEU on Multi30k test_2016_flickr: sacreBLEU {result['sacrebleu']:.1f} (detokenized; "
      f"{result['sacrebleu_signature']}), tokenized BLEU {result['tokenized_bleu']:.1f}")
PY
if [[ -n "${RESULTS_JSON:-}" ]]; then
  "$PYTHON" - "$SAVE_DIR" "$RESULTS_JSON" "$train_s" "$(($(date +%s) - start))" "$MODEL" <<'PY'
import json, os, re, sys
save, out, train_s, total_s, model = sys.argv[1:]
result = json.load(open(f"{save}/eval/test.json"))
log = open(f"{save}/train.log", encoding="utf-8").read()
updates = max(int(n) for n in re.findall(r"num_updates[ =](\d+)", log))
summary = {"model": model, "sacrebleu": result["sacrebleu"], "sacrebleu_signature": result["sacrebleu_signature"],
           "tokenized_bleu": result["tokenized_bleu"], "updates": updates, "train_minutes": int(train_s) / 60,
           "total_minutes": int(total_s) / 60, "cpus": len(os.sched_getaffinity(0))}
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
with open(out + ".part", "w") as f:
    json.dump(summary, f, indent=2)
os.replace(out + ".part", out)
PY
  log "wrote $RESULTS_JSON"
fi
log "done in $((($(date +%s) - start) / 60)) min; results in $SAVE_DIR/eval/test.json"
