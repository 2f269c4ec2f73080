#!/usr/bin/env bash
# Multi30k (task 1) German-English: the quickstart's small real corpus.
# Same steps as the IWSLT14 recipe: Moses tokenisation + lowercasing, joint BPE,
# fairseq-preprocess with a joined dictionary.
#   train: 29,000 pairs; valid: val (1,014); test: test_2016_flickr (1,000).
# Output: data-bin/multi30k.de-en.
#
#   bash scripts/prepare-multi30k.sh
#
# Variables (all optional):
#   MULTI30K_DIR   a local folder with {train,val,test_2016_flickr}.{de,en}.gz
#                  (tests and CI use ../shared/data/multi30k), read only, never
#                  downloaded into; unset: downloaded to $CACHE/multi30k
# Training pairs with a whitespace-only side are dropped (with a warning); such lines
# of valid/test are kept (aligned with the references), with a warning.
#   MULTI30K_URL   base address of those files (the multi30k/dataset repository)
#   TRAIN_LINES    use only the first N training pairs (0 = all)       (0)
#   CACHE, WORK, DEST, BPE, BPE_TOKENS (6000), WORKERS, OFFLINE, FORCE: as in prepare-iwslt14.sh
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
EA_STEP=prepare-multi30k

SRC=de
TGT=en
MULTI30K_URL=${MULTI30K_URL:-https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw}
CACHE=${CACHE:-$EA_REPO/work/downloads}
# a folder the user names is their own copy: read, never downloaded into
LOCAL_COPY=${MULTI30K_DIR:+1}
MULTI30K_DIR=${MULTI30K_DIR:-$CACHE/multi30k}
WORK=${WORK:-$EA_REPO/work/multi30k.de-en}
DEST=${DEST:-$EA_REPO/data-bin/multi30k.de-en}
BPE=${BPE:-subword-nmt}
BPE_TOKENS=${BPE_TOKENS:-6000}
WORKERS=${WORKERS:-$(nproc)}
TRAIN_LINES=${TRAIN_LINES:-0}
require_int TRAIN_LINES 0
require_int BPE_TOKENS 1
RECIPE_SETTINGS="train_lines=$TRAIN_LINES"
TMP=$WORK/tmp
MARKERS=$WORK/.done
SACREBLEU_REF="test.raw.$TGT: test_2016_flickr.$TGT.gz as released, lowercased (the data are lowercased)"

# split name in this recipe -> file name in Multi30k
declare -A SPLITS=([train]=train [valid]=val [test]=test_2016_flickr)
INPUTS=()
for s in train valid test; do
  for l in $SRC $TGT; do
    INPUTS+=("$MULTI30K_DIR/${SPLITS[$s]}.$l.gz")
  done
done
if [[ -n "$LOCAL_COPY" ]]; then
  for f in "${INPUTS[@]}"; do
    [[ -s "$f" ]] || die "MULTI30K_DIR=$MULTI30K_DIR: $(basename "$f") is missing or empty (a local copy needs" \
      "{train,val,test_2016_flickr}.{de,en}.gz; leave MULTI30K_DIR unset to download them to $CACHE/multi30k)"
  done
fi

recipe_start

if ! step_done tok; then
  for s in train valid test; do
    for l in $SRC $TGT; do
      gz="$MULTI30K_DIR/${SPLITS[$s]}.$l.gz"
      fetch "$MULTI30K_URL/${SPLITS[$s]}.$l.gz" "$gz"
    done
  done
  record_inputs
  for s in train valid test; do
    for l in $SRC $TGT; do
      gz="$MULTI30K_DIR/${SPLITS[$s]}.$l.gz"
      gzip -dc "$gz" | textprep --input-name "$gz" utf8 >"$TMP/$s.raw.$l.tmp" || die "could not read $gz (see above)"
      [[ -s "$TMP/$s.raw.$l.tmp" ]] || die "$gz: no text in it (a broken download? delete it to fetch it again)"
      if [[ "$s" == train && "$TRAIN_LINES" -gt 0 ]]; then
        head -n "$TRAIN_LINES" "$TMP/$s.raw.$l.tmp" >"$TMP/$s.raw.$l.head"
        mv "$TMP/$s.raw.$l.head" "$TMP/$s.raw.$l.tmp"
      fi
      if [[ "$s" != train ]]; then
        textprep --input-name "$gz" blank-lines --what "$s set" "$TMP/$s.raw.$l.tmp"
      fi
      mv "$TMP/$s.raw.$l.tmp" "$TMP/$s.raw.$l"
    done
    a=$(n_lines "$TMP/$s.raw.$SRC")
    b=$(n_lines "$TMP/$s.raw.$TGT")
    [[ "$a" == "$b" ]] || die "line counts differ: $MULTI30K_DIR/${SPLITS[$s]}.$SRC.gz has $a lines," \
      "$MULTI30K_DIR/${SPLITS[$s]}.$TGT.gz has $b (the sides of a corpus are line-aligned)"
    if [[ "$s" == train ]]; then
      # as the cleaning step of fairseq's recipes: no training pair with an empty side
      textprep --input-name "$MULTI30K_DIR/train.{$SRC,$TGT}.gz" drop-blank "$TMP/train.raw" $SRC $TGT "$TMP/train.nonblank"
      for l in $SRC $TGT; do mv "$TMP/train.nonblank.$l" "$TMP/train.raw.$l"; done
    fi
    for l in $SRC $TGT; do
      textprep tokenize -l "$l" --lowercase --workers "$WORKERS" <"$TMP/$s.raw.$l" >"$TMP/$s.$l.tmp"
      mv "$TMP/$s.$l.tmp" "$TMP/$s.$l"
    done
    same_lines "$TMP/$s.$SRC" "$TMP/$s.$TGT"
  done
  mark_done tok
fi

if ! step_done bpe; then
  subword_splits
  for l in $SRC $TGT; do
    textprep lowercase <"$TMP/test.raw.$l" >"$WORK/test.raw.$l"
  done
  mark_done bpe
fi

binarize "$WORK" $SRC $TGT "$DEST"
