#!/usr/bin/env bash
# Evaluate a trained benchmark model: average the last N checkpoints, decode the test
# set with fairseq-generate (the benchmark's beam and length penalty), then score:
# tokenised BLEU as papers report it (compound-split for En-De) and detokenised
# sacreBLEU with its signature. Results: $SAVE_DIR/eval/test.json (+ the outputs).
#
#   bash scripts/evaluate.sh iwslt14        # beam 5, lenpen 1
#   bash scripts/evaluate.sh wmt14_en_de    # beam 4, lenpen 0.6, compound splitting
#   bash scripts/evaluate.sh wmt14_en_fr    # beam 4, lenpen 0.6
#   bash scripts/evaluate.sh multi30k       # beam 5, lenpen 1
#   bash scripts/evaluate.sh tatoeba        # beam 5, lenpen 1 (cased sacreBLEU against test.en as given)
#
# Variables (all optional):
#   MODEL, DATA_BIN, SAVE_DIR   as in scripts/train.sh
#   NUM_AVG      checkpoints to average (epoch checkpoints, or update checkpoints
#                when there are none); 1 = no averaging    (5; 10 for wmt14_en_fr, 3 for multi30k, tatoeba)
#   CHECKPOINT   a checkpoint file to use as is (skips averaging)
#   BEAM, LENPEN, MAX_TOKENS (generation); GEN_ARGS: more fairseq-generate arguments
#   CPU=1        decode on the CPU (automatic without GPU)
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

BENCH=${1:-}
EA_STEP=evaluate-$BENCH
MODEL=${MODEL:-ea}
COMPOUND=()
case "$BENCH" in
  iwslt14) DATA_DIR=iwslt14.tokenized.de-en BEAM=${BEAM:-5} LENPEN=${LENPEN:-1} NUM_AVG=${NUM_AVG:-5} ;;
  wmt14_en_de)
    DATA_DIR=$BENCH BEAM=${BEAM:-4} LENPEN=${LENPEN:-0.6} NUM_AVG=${NUM_AVG:-5}
    COMPOUND=(--compound-split)
    ;;
  wmt14_en_fr) DATA_DIR=$BENCH BEAM=${BEAM:-4} LENPEN=${LENPEN:-0.6} NUM_AVG=${NUM_AVG:-10} ;;
  multi30k) DATA_DIR=multi30k.de-en BEAM=${BEAM:-5} LENPEN=${LENPEN:-1} NUM_AVG=${NUM_AVG:-3} ;;
  tatoeba) DATA_DIR=tatoeba.de-en BEAM=${BEAM:-5} LENPEN=${LENPEN:-1} NUM_AVG=${NUM_AVG:-3} ;;
  *) die "usage: evaluate.sh iwslt14|wmt14_en_de|wmt14_en_fr|multi30k|tatoeba (got '$BENCH')" ;;
esac
SUBSET="test"  # the references kept by the prepare recipes are the test set's

require_int NUM_AVG 1
require_int BEAM 1
[[ -z "${MAX_TOKENS:-}" ]] || require_int MAX_TOKENS 1
ea_activate_env
require_cmd fairseq-generate "run scripts/install.sh"
DATA_BIN=${DATA_BIN:-$EA_REPO/data-bin/$DATA_DIR}
SAVE_DIR=${SAVE_DIR:-$EA_REPO/checkpoints/$BENCH/$MODEL}
[[ -f "$DATA_BIN/PREPARED" ]] || die "$DATA_BIN is not a prepared data folder (run scripts/prepare-*.sh first)"
if [[ -z "${CHECKPOINT:-}" ]]; then
  # checked before anything is written: a mistyped SAVE_DIR is not created
  [[ -d "$SAVE_DIR" ]] || die "SAVE_DIR=$SAVE_DIR: no such folder (train first: bash scripts/train.sh $BENCH; or set SAVE_DIR, or CHECKPOINT=a .pt file)"
  compgen -G "$SAVE_DIR/checkpoint*.pt" >/dev/null \
    || die "SAVE_DIR=$SAVE_DIR: no checkpoint*.pt in it (train first: bash scripts/train.sh $BENCH)"
fi
SRC=$(sed -n 's/^source=//p' "$DATA_BIN/PREPARED")
TGT=$(sed -n 's/^target=//p' "$DATA_BIN/PREPARED")
BPE_KIND=$(sed -n 's/^bpe=//p' "$DATA_BIN/PREPARED")
REF_DESC=$(sed -n 's/^reference=//p' "$DATA_BIN/PREPARED")
for f in "$DATA_BIN/test.tok.$TGT" "$DATA_BIN/test.raw.$TGT"; do
  require_file "$f" "made by the prepare recipe"
done
OUT=$SAVE_DIR/eval
mkdir -p "$OUT"

# 1. which checkpoint ------------------------------------------------------------------------
if [[ -n "${CHECKPOINT:-}" ]]; then
  require_file "$CHECKPOINT"
  CKPT=$CHECKPOINT
elif ((NUM_AVG > 1)); then
  n_epoch=$(find "$SAVE_DIR" -maxdepth 1 -regex '.*/checkpoint[0-9]+\.pt' | wc -l)
  n_update=$(find "$SAVE_DIR" -maxdepth 1 -regex '.*/checkpoint_[0-9]+_[0-9]+\.pt' | wc -l)
  if ((n_epoch >= NUM_AVG)); then
    KIND=(--num-epoch-checkpoints "$NUM_AVG")
  elif ((n_update >= NUM_AVG)); then
    KIND=(--num-update-checkpoints "$NUM_AVG")
  else
    die "$SAVE_DIR: fewer than NUM_AVG=$NUM_AVG epoch or update checkpoints ($n_epoch, $n_update); set NUM_AVG=1"
  fi
  CKPT=$OUT/checkpoint.avg$NUM_AVG.pt
  "$PYTHON" "$EA_REPO/scripts/average_checkpoints.py" --inputs "$SAVE_DIR" "${KIND[@]}" --output "$CKPT" \
    || die "could not average the last $NUM_AVG checkpoints of $SAVE_DIR (see above)"
else
  CKPT=$SAVE_DIR/checkpoint_best.pt
  [[ -f "$CKPT" ]] || CKPT=$SAVE_DIR/checkpoint_last.pt
  require_file "$CKPT" "no checkpoint in $SAVE_DIR"
fi

# 2. decode -------------------------------------------------------------------------------------
# fairseq-generate decodes on the GPU where torch sees one, on the CPU otherwise
DEVICE=()
[[ "${CPU:-0}" != 1 ]] || DEVICE=(--cpu)
if [[ "$BPE_KIND" == sentencepiece ]]; then POST=(--post-process sentencepiece); else POST=(--remove-bpe); fi
read -r -a GEN_EXTRA <<<"${GEN_ARGS:-}"
GEN=$OUT/$SUBSET.gen
log "decoding $SUBSET with $CKPT (beam $BEAM, lenpen $LENPEN)"
fairseq-generate "$DATA_BIN" --user-dir "$EA_REPO/ea_fairseq" --path "$CKPT" --gen-subset "$SUBSET" \
  --source-lang "$SRC" --target-lang "$TGT" --beam "$BEAM" --lenpen "$LENPEN" \
  --max-tokens "${MAX_TOKENS:-8000}" "${POST[@]}" "${DEVICE[@]}" "${GEN_EXTRA[@]}" >"$GEN.tmp" \
  || die "fairseq-generate failed (its output: $GEN.tmp)"
mv "$GEN.tmp" "$GEN"
grep -E "^Generate .* BLEU" "$GEN" >&2 || true

# 3. score ----------------------------------------------------------------------------------------
META=$("$PYTHON" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
  benchmark "$BENCH" model "$MODEL" checkpoint "$CKPT" subset "$SUBSET" beam "$BEAM" lenpen "$LENPEN")
"$PYTHON" "$EA_REPO/scripts/lib/score.py" --gen "$GEN" --ref-tok "$DATA_BIN/test.tok.$TGT" \
  --ref-raw "$DATA_BIN/test.raw.$TGT" --ref-desc "${REF_DESC:-test.raw.$TGT}" --lang "$TGT" "${COMPOUND[@]}" \
  --json "$OUT/$SUBSET.json" \
  --detok-out "$OUT/$SUBSET.detok.$TGT" --meta "$META"
log "results: $OUT/$SUBSET.json"
