#!/usr/bin/env bash
# A small second language pair for CPU-scale quality benchmarks, from the already
# tokenised files in ../shared/data/wmt_small (see its README), processed with the WMT14
# recipe's code (scripts/prepare-wmt14.sh):
#   1. Moses-detokenise the released (tokenised, &apos;-escaped) text: this gives the
#      untokenised references sacreBLEU needs, and text the WMT steps expect;
#   2. the WMT14 steps: punctuation normalisation, non-printing characters removed, Moses
#      tokenisation with aggressive hyphen splitting (-a), case kept; joint BPE; training
#      pairs cleaned after BPE (1..MAX_LEN tokens, ratio 1.5); valid/test not cleaned.
#
#   bash scripts/prepare-wmt-small.sh fr-en   # Europarl v7 Fr->En, 20k lines  -> data-bin/europarl20k.fr-en
#   bash scripts/prepare-wmt-small.sh en-de   # WMT En->De, 10k pairs          -> data-bin/wmt10k.en-de
#
# Splits:
#   fr-en: the 20,000 Europarl lines: train = the first 18,000, valid = the next 1,000,
#          test = the last 1,000 (in domain, held out like IWSLT14's valid). newstest2012 is NOT used by default: with 18k
#          Europarl pairs a small model scores a few BLEU on news, too little to compare
#          settings; TEST=newstest2012 uses its first 1,500 lines as valid and the other
#          1,503 as test instead.
#   en-de: train 10,000 (mixed WMT), valid newstest2012 (3,000), test the filtered
#          newstest2014 (2,737), as released. Small: expect low BLEU.
# The sacreBLEU references are detokenised from the released tokenised text (step 1),
# not the original raw text: sacreBLEU scores are comparable between runs here, not
# with published numbers.
#
# Variables (all optional):
#   WMT_SMALL_DIR  folder holding fr-en_europarl20k/ and en-de_10k/
#                  ($EA_SHARED_DATA/wmt_small, default ../shared/data/wmt_small)
#   TEST           fr-en only: europarl | newstest2012                  (europarl)
#   MAX_LEN        longest training pair kept, in BPE tokens            (250, WMT's)
#   TRAIN_LINES    fr-en only: train on the first N of the training lines (0 = all) (0)
#   WORK, DEST, BPE, BPE_TOKENS (8000), WORKERS, FORCE: as in prepare-wmt14.sh
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

PAIR=${1:-${PAIR:-}}
TEST=${TEST:-europarl}
case "$PAIR" in
  fr-en)
    SRC=fr TGT=en NAME=europarl20k.fr-en SUB=fr-en_europarl20k
    case "$TEST" in europarl | newstest2012) ;; *) die "TEST=$TEST: expected europarl or newstest2012" ;; esac
    ;;
  en-de) SRC=en TGT=de NAME=wmt10k.en-de SUB=en-de_10k ;;
  *) die "usage: prepare-wmt-small.sh fr-en|en-de (got '$PAIR')" ;;
esac
EA_STEP=prepare-$NAME
SHARED_DATA=${EA_SHARED_DATA:-$EA_REPO/../shared/data}
WMT_SMALL_DIR=${WMT_SMALL_DIR:-$SHARED_DATA/wmt_small}
WORK=${WORK:-$EA_REPO/work/$NAME}
DEST=${DEST:-$EA_REPO/data-bin/$NAME}
BPE=${BPE:-subword-nmt}
BPE_TOKENS=${BPE_TOKENS:-8000}
MAX_LEN=${MAX_LEN:-250}
WORKERS=${WORKERS:-$(nproc)}
TRAIN_LINES=${TRAIN_LINES:-0}
require_int TRAIN_LINES 0
[[ "$PAIR" == fr-en || "$TRAIN_LINES" == 0 ]] || die "TRAIN_LINES=$TRAIN_LINES: only fr-en takes a subset (en-de has 10,000 pairs)"
RECIPE_SETTINGS="pair=$PAIR test=$TEST max_len=$MAX_LEN train_lines=$TRAIN_LINES"
[[ "$PAIR" == fr-en ]] || RECIPE_SETTINGS="pair=$PAIR max_len=$MAX_LEN"
TMP=$WORK/tmp
MARKERS=$WORK/.done
ORIG=$WMT_SMALL_DIR/$SUB
[[ -d "$ORIG" ]] || die "$ORIG not found: set WMT_SMALL_DIR to the folder holding $SUB/ (../shared/data/wmt_small)"

recipe_start

# 1. the released files, per split: detokenised ("raw") text ------------------------------
# raw_split NAME FILE_SRC FILE_TGT [SED_RANGE]: $TMP/NAME.raw.{SRC,TGT}
raw_split() {
  local name=$1 fs=$2 ft=$3 range=${4:-}
  same_lines "$fs" "$ft"
  local l f
  for l in $SRC $TGT; do
    if [[ "$l" == "$SRC" ]]; then f=$fs; else f=$ft; fi
    if [[ -n "$range" ]]; then
      sed -n "${range}p" "$f" | textprep detok -l "$l" --workers "$WORKERS" >"$TMP/$name.raw.$l.tmp"
    else
      textprep detok -l "$l" --workers "$WORKERS" <"$f" >"$TMP/$name.raw.$l.tmp"
    fi
    mv "$TMP/$name.raw.$l.tmp" "$TMP/$name.raw.$l"
  done
  same_lines "$TMP/$name.raw.$SRC" "$TMP/$name.raw.$TGT"
}

if ! step_done detok; then
  if [[ "$PAIR" == fr-en ]]; then
    E=$ORIG/europarl-v7.fr-en
    n=$(n_lines "$E.en")
    ((n > 2000)) || die "$E.en has $n lines: need more than 2,000 (the last 2,000 are valid and test)"
    if [[ "$TEST" == europarl ]]; then
      last=$((n - 2000))
      ((TRAIN_LINES == 0 || TRAIN_LINES <= last)) || die "TRAIN_LINES=$TRAIN_LINES: $E.en has only $last training lines"
      ((TRAIN_LINES == 0)) || last=$TRAIN_LINES
      raw_split train "$E.$SRC" "$E.$TGT" "1,$last"
      raw_split valid "$E.$SRC" "$E.$TGT" "$((n - 1999)),$((n - 1000))"
      raw_split test "$E.$SRC" "$E.$TGT" "$((n - 999)),\$"
    else
      N=$ORIG/newstest2012
      ((TRAIN_LINES == 0 || TRAIN_LINES <= n)) || die "TRAIN_LINES=$TRAIN_LINES: $E.en has only $n lines"
      raw_split train "$E.$SRC" "$E.$TGT" "1,$((TRAIN_LINES == 0 ? n : TRAIN_LINES))"
      raw_split valid "$N.$SRC" "$N.$TGT" "1,1500"
      raw_split test "$N.$SRC" "$N.$TGT" "1501,\$"
    fi
  else
    raw_split train "$ORIG/src-train.txt" "$ORIG/tgt-train.txt"
    raw_split valid "$ORIG/src-val.txt" "$ORIG/tgt-val.txt"
    raw_split test "$ORIG/src-test.txt" "$ORIG/tgt-test.txt"
  fi
  mark_done detok
fi

# 2. the WMT14 recipe's normalisation and tokenisation ------------------------------------------
if ! step_done tok; then
  for s in train valid test; do
    for l in $SRC $TGT; do
      textprep normalize -l "$l" --workers "$WORKERS" <"$TMP/$s.raw.$l" \
        | textprep tokenize -l "$l" -a --workers "$WORKERS" >"$TMP/$s.$l.tmp"
      mv "$TMP/$s.$l.tmp" "$TMP/$s.$l"
    done
    same_lines "$TMP/$s.$SRC" "$TMP/$s.$TGT"
  done
  mark_done tok
fi

# 3. joint subwords, then cleaning of the training pairs (as prepare-wmt14.sh) ----------------
if ! step_done bpe; then
  subword_splits
  textprep clean --ratio 1.5 "$WORK/train" $SRC $TGT "$TMP/train.clean" 1 "$MAX_LEN"
  for l in $SRC $TGT; do
    mv "$TMP/train.clean.$l" "$WORK/train.$l"
    cp "$TMP/test.raw.$l" "$WORK/test.raw.$l"
  done
  same_lines "$WORK/train.$SRC" "$WORK/train.$TGT"
  mark_done bpe
fi

# 4. binarise ----------------------------------------------------------------------------
binarize "$WORK" $SRC $TGT "$DEST"
