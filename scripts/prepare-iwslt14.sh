#!/usr/bin/env bash
# IWSLT14 German-English, as fairseq's examples/translation/prepare-iwslt14.sh makes it,
# with sacremoses instead of a Perl checkout of Moses:
#   train: train.tags minus <url>/<talkid>/<keywords> lines and <title>/<description>
#          tags -> Moses tokenisation -> clean (1..175 tokens, ratio 1.5) -> lowercase;
#          valid = every 23rd line of it, train = the rest;
#   test:  dev2010 + TEDX dev2012 + tst2010 + tst2011 + tst2012 (<seg> texts, ’ -> ',
#          tokenised, lowercased), concatenated in that order; the sacreBLEU
#          reference (test.raw.en) is the released <seg> texts, XML entities
#          decoded, lowercased (nothing else changed);
#   joint BPE, 10k merges (subword-nmt; BPE=sentencepiece for SentencePiece).
# Output: data-bin/iwslt14.tokenized.de-en (binarised, joined dictionary, plus the BPE
# model and the raw/tokenised test references used by scripts/evaluate.sh).
#
#   bash scripts/prepare-iwslt14.sh
#
# Variables (all optional):
#   IWSLT14_URL   download address of de-en.tgz        (fairseq's public mirror)
#   IWSLT14_TGZ   a local de-en.tgz to use instead     ($CACHE/de-en.tgz)
#   IWSLT14_DIR   an already unpacked folder holding de-en/train.tags.de-en.de ... (skips the tgz)
#   CACHE         download cache                       (work/downloads)
#   WORK          intermediate and text files          (work/iwslt14.tokenized.de-en)
#   DEST          binarised output                     (data-bin/iwslt14.tokenized.de-en)
#   BPE           subword-nmt | sentencepiece          (subword-nmt)
#   BPE_TOKENS    merges (subword-nmt) or vocabulary size (sentencepiece)  (10000)
#   WORKERS       processes for tokenisation, BPE and binarisation          (nproc)
#   OFFLINE=1     never download; FORCE=1 redo every step
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
EA_STEP=prepare-iwslt14

SRC=de
TGT=en
LANG_PAIR=de-en
IWSLT14_URL=${IWSLT14_URL:-http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz}
CACHE=${CACHE:-$EA_REPO/work/downloads}
# a file the user names is their own copy: read, never downloaded to
LOCAL_TGZ=${IWSLT14_TGZ:+1}
IWSLT14_TGZ=${IWSLT14_TGZ:-$CACHE/de-en.tgz}
WORK=${WORK:-$EA_REPO/work/iwslt14.tokenized.de-en}
DEST=${DEST:-$EA_REPO/data-bin/iwslt14.tokenized.de-en}
BPE=${BPE:-subword-nmt}
BPE_TOKENS=${BPE_TOKENS:-10000}
WORKERS=${WORKERS:-$(nproc)}
TMP=$WORK/tmp
MARKERS=$WORK/.done
require_int BPE_TOKENS 1
SACREBLEU_REF="test.raw.$TGT: the <seg> texts of the five XML files as released (XML entities decoded), lowercased (the data are lowercased)"
TEST_SETS=(IWSLT14.TED.dev2010 IWSLT14.TEDX.dev2012 IWSLT14.TED.tst2010 IWSLT14.TED.tst2011 IWSLT14.TED.tst2012)
if [[ -n "${IWSLT14_DIR:-}" ]]; then
  INPUTS=()
  for l in $SRC $TGT; do
    INPUTS+=("$IWSLT14_DIR/$LANG_PAIR/train.tags.$LANG_PAIR.$l")
    for t in "${TEST_SETS[@]}"; do INPUTS+=("$IWSLT14_DIR/$LANG_PAIR/$t.$LANG_PAIR.$l.xml"); done
  done
else
  INPUTS=("$IWSLT14_TGZ")
fi

recipe_start

# 1. raw files --------------------------------------------------------------------
if [[ -n "${IWSLT14_DIR:-}" ]]; then
  ORIG=$IWSLT14_DIR
else
  ORIG=$WORK/orig
  if ! step_done unpack; then
    [[ -z "$LOCAL_TGZ" || -s "$IWSLT14_TGZ" ]] \
      || die "IWSLT14_TGZ=$IWSLT14_TGZ: no such file (leave IWSLT14_TGZ unset to download it to $CACHE)"
    fetch "$IWSLT14_URL" "$IWSLT14_TGZ"
    record_inputs
    rm -rf "$ORIG"
    mkdir -p "$ORIG"
    tar -xzf "$IWSLT14_TGZ" -C "$ORIG" || die "could not unpack $IWSLT14_TGZ"
    mark_done unpack
  fi
fi
for l in $SRC $TGT; do
  require_file "$ORIG/$LANG_PAIR/train.tags.$LANG_PAIR.$l" "IWSLT14 training file"
done
same_lines "$ORIG/$LANG_PAIR/train.tags.$LANG_PAIR.$SRC" "$ORIG/$LANG_PAIR/train.tags.$LANG_PAIR.$TGT"
for t in "${TEST_SETS[@]}"; do
  for l in $SRC $TGT; do
    require_file "$ORIG/$LANG_PAIR/$t.$LANG_PAIR.$l.xml" "IWSLT14 test file"
  done
done

# 2. training data: tags, tokenise, clean, lowercase ---------------------------------
if ! step_done train-tok; then
  for l in $SRC $TGT; do
    log "tokenising train.tags.$LANG_PAIR.$l"
    textprep_in "$ORIG/$LANG_PAIR/train.tags.$LANG_PAIR.$l" iwslt-train \
      | textprep tokenize -l "$l" --workers "$WORKERS" >"$TMP/train.tags.$LANG_PAIR.tok.$l.tmp"
    mv "$TMP/train.tags.$LANG_PAIR.tok.$l.tmp" "$TMP/train.tags.$LANG_PAIR.tok.$l"
  done
  same_lines "$TMP/train.tags.$LANG_PAIR.tok.$SRC" "$TMP/train.tags.$LANG_PAIR.tok.$TGT"
  mark_done train-tok
fi
if ! step_done train-clean; then
  textprep clean --ratio 1.5 "$TMP/train.tags.$LANG_PAIR.tok" $SRC $TGT "$TMP/train.tags.$LANG_PAIR.clean.tmp" 1 175
  for l in $SRC $TGT; do
    textprep lowercase <"$TMP/train.tags.$LANG_PAIR.clean.tmp.$l" >"$TMP/train.tags.$LANG_PAIR.$l"
    rm "$TMP/train.tags.$LANG_PAIR.clean.tmp.$l"
  done
  same_lines "$TMP/train.tags.$LANG_PAIR.$SRC" "$TMP/train.tags.$LANG_PAIR.$TGT"
  mark_done train-clean
fi

# 3. valid/test sets from the XML files ------------------------------------------------
if ! step_done test-tok; then
  for t in "${TEST_SETS[@]}"; do
    for l in $SRC $TGT; do
      xml="$ORIG/$LANG_PAIR/$t.$LANG_PAIR.$l.xml"
      textprep_in "$xml" segs >"$TMP/$t.seg.$l"
      # the sacreBLEU reference: the segments as released
      textprep_in "$xml" ref-segs >"$TMP/$t.raw.$l"
      textprep --input-name "$xml" blank-lines --what "test set" "$TMP/$t.raw.$l"
      textprep tokenize -l "$l" --lowercase --workers "$WORKERS" <"$TMP/$t.seg.$l" >"$TMP/$t.$l"
    done
    same_lines "$TMP/$t.$SRC" "$TMP/$t.$TGT"
    same_lines "$TMP/$t.raw.$SRC" "$TMP/$t.$SRC"
  done
  mark_done test-tok
fi

# 4. splits ---------------------------------------------------------------------------
if ! step_done split; then
  for l in $SRC $TGT; do
    textprep every 23 <"$TMP/train.tags.$LANG_PAIR.$l" >"$TMP/valid.$l"
    textprep every 23 --invert <"$TMP/train.tags.$LANG_PAIR.$l" >"$TMP/train.$l"
    rm -f "$TMP/test.$l" "$TMP/test.raw.$l"
    for t in "${TEST_SETS[@]}"; do
      cat "$TMP/$t.$l" >>"$TMP/test.$l"
      # lowercased, untokenised references for detokenised BLEU
      textprep lowercase <"$TMP/$t.raw.$l" >>"$TMP/test.raw.$l"
    done
  done
  for s in train valid test test.raw; do
    same_lines "$TMP/$s.$SRC" "$TMP/$s.$TGT"
  done
  mark_done split
fi

# 5. joint subwords -----------------------------------------------------------------------
if ! step_done bpe; then
  subword_splits
  for l in $SRC $TGT; do
    cp "$TMP/test.raw.$l" "$WORK/test.raw.$l"
  done
  mark_done bpe
fi

# 6. binarise ---------------------------------------------------------------------------
binarize "$WORK" $SRC $TGT "$DEST"
