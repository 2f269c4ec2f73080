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
#                  (tests and CI use ../shared/data/multi30k); otherwise downloaded
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
MULTI30K_DIR=${MULTI30K_DIR:-$CACHE/multi30k}
WORK=${WORK:-$EA_REPO/work/multi30k.de-en}
DEST=${DEST:-$EA_REPO/data-bin/multi30k.de-en}
BPE=${BPE:-subword-nmt}
BPE_TOKENS=${BPE_TOKENS:-6000}
WORKERS=${WORKERS:-$(nproc)}
TRAIN_LINES=${TRAIN_LINES:-0}
RECIPE_SETTINGS="train_lines=$TRAIN_LINES"
TMP=$WORK/tmp
MARKERS=$WORK/.done

recipe_start

# split name in this recipe -> file name in Multi30k
declare -A SPLITS=([train]=train [valid]=val [test]=test_2016_flickr)

if ! step_done tok; then
  for s in train valid test; do
    for l in $SRC $TGT; do
      gz="$MULTI30K_DIR/${SPLITS[$s]}.$l.gz"
      fetch "$MULTI30K_URL/${SPLITS[$s]}.$l.gz" "$gz"
      gzip -dc "$gz" >"$TMP/$s.raw.$l.tmp" || die "could not read $gz"
      if [[ "$s" == train && "$TRAIN_LINES" -gt 0 ]]; then
        head -n "$TRAIN_LINES" "$TMP/$s.raw.$l.tmp" >"$TMP/$s.raw.$l.head"
        mv "$TMP/$s.raw.$l.head" "$TMP/$s.raw.$l.tmp"
      fi
      mv "$TMP/$s.raw.$l.tmp" "$TMP/$s.raw.$l"
    done
    same_lines "$TMP/$s.raw.$SRC" "$TMP/$s.raw.$TGT"
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
