#!/usr/bin/env bash
# WMT14 English-German or English-French, following fairseq's
# examples/translation/prepare-wmt14en2{de,fr}.sh, with sacremoses instead of Perl:
#   train: the corpora below -> punctuation normalisation -> non-printing characters
#          removed -> Moses tokenisation with aggressive hyphen splitting (-a);
#          joint BPE; pairs cleaned after BPE (1..250 tokens, ratio 1.5);
#   valid: newstest2013 (dev.tgz), tokenised like the test set, not cleaned;
#   test:  newstest2014, full version (test-full.tgz, SGML), <seg> texts with
#          ’ -> ', tokenised (-a), not cleaned; the sacreBLEU reference
#          (test.raw.<tgt>) is the reference's segments as released, unchanged.
# Corpora (fairseq's lists):
#   en-de: Europarl v7, Common Crawl, News Commentary v9 (WMT14's; fairseq's --icml17)
#   en-fr: Europarl v7, Common Crawl, UN (undoc.2000), News Commentary v9, Giga-FrEn
# Output: data-bin/wmt14_en_de or data-bin/wmt14_en_fr.
#
#   bash scripts/prepare-wmt14.sh en-de        (or: bash scripts/prepare-wmt14en2de.sh)
#   bash scripts/prepare-wmt14.sh en-fr        (or: bash scripts/prepare-wmt14en2fr.sh)
#
# Variables (all optional):
#   CACHE        download cache: the archives are looked for here first   (work/downloads)
#   WORK         intermediate and text files                     (work/wmt14_en_XX)
#   DEST         binarised output                                 (data-bin/wmt14_en_XX)
#   BPE          subword-nmt | sentencepiece                      (subword-nmt)
#   BPE_TOKENS   merges / vocabulary size        (en-de: 32000, en-fr: 40000; see README)
#   WORKERS      processes for tokenisation, BPE and binarisation (nproc)
#   OFFLINE=1    never download; FORCE=1 redo every step
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

PAIR=${1:-${PAIR:-}}
case "$PAIR" in
  en-de)
    TGT=de
    DEFAULT_BPE_TOKENS=32000
    ARCHIVES=(
      "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz"
      "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz"
      "http://statmt.org/wmt14/training-parallel-nc-v9.tgz"
    )
    CORPORA=(training/europarl-v7.de-en commoncrawl.de-en training/news-commentary-v9.de-en)
    TEST_PREFIX=test-full/newstest2014-deen
    ;;
  en-fr)
    TGT=fr
    DEFAULT_BPE_TOKENS=40000
    ARCHIVES=(
      "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz"
      "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz"
      "http://statmt.org/wmt13/training-parallel-un.tgz"
      "http://statmt.org/wmt14/training-parallel-nc-v9.tgz"
      "http://statmt.org/wmt10/training-giga-fren.tar"
    )
    CORPORA=(training/europarl-v7.fr-en commoncrawl.fr-en un/undoc.2000.fr-en training/news-commentary-v9.fr-en
      giga-fren.release2.fixed)
    TEST_PREFIX=test-full/newstest2014-fren
    ;;
  *) die "usage: prepare-wmt14.sh en-de|en-fr (got '${PAIR}')" ;;
esac
ARCHIVES+=("http://data.statmt.org/wmt17/translation-task/dev.tgz" "http://statmt.org/wmt14/test-full.tgz")
SRC=en
NAME=wmt14_en_$TGT
EA_STEP=prepare-$NAME
CACHE=${CACHE:-$EA_REPO/work/downloads}
WORK=${WORK:-$EA_REPO/work/$NAME}
DEST=${DEST:-$EA_REPO/data-bin/$NAME}
BPE=${BPE:-subword-nmt}
BPE_TOKENS=${BPE_TOKENS:-$DEFAULT_BPE_TOKENS}
WORKERS=${WORKERS:-$(nproc)}
ORIG=$WORK/orig
TMP=$WORK/tmp
MARKERS=$WORK/.done
require_int BPE_TOKENS 1
SACREBLEU_REF="test.raw.$TGT: newstest2014 (full) $TEST_PREFIX-ref.$TGT.sgm, the segments as released (as sacrebleu -t wmt14/full reads them)"
INPUTS=()
for url in "${ARCHIVES[@]}"; do INPUTS+=("$CACHE/$(basename "$url")"); done

recipe_start

# 1. archives ------------------------------------------------------------------------
if ! step_done unpack; then
  rm -rf "$ORIG"
  mkdir -p "$ORIG"
  for url in "${ARCHIVES[@]}"; do
    archive="$CACHE/$(basename "$url")"
    fetch "$url" "$archive"
    record_inputs
    log "unpacking $archive"
    tar -xf "$archive" -C "$ORIG" || die "could not unpack $archive"
  done
  # Giga-FrEn comes as gzipped text inside its tar
  for gz in "$ORIG"/giga-fren.release2.fixed.*.gz; do
    [[ -e "$gz" ]] || continue
    gunzip -f "$gz" || die "could not gunzip $gz"
  done
  mark_done unpack
fi
for c in "${CORPORA[@]}"; do
  same_lines "$ORIG/$c.$SRC" "$ORIG/$c.$TGT"
done
TEST_SRC="$ORIG/$TEST_PREFIX-src.$SRC.sgm"
TEST_REF="$ORIG/$TEST_PREFIX-ref.$TGT.sgm"
require_file "$TEST_SRC" "newstest2014 source (test-full.tgz)"
require_file "$TEST_REF" "newstest2014 reference (test-full.tgz)"
same_lines "$ORIG/dev/newstest2013.$SRC" "$ORIG/dev/newstest2013.$TGT"

# 2. training data ------------------------------------------------------------------------
if ! step_done train-tok; then
  for l in $SRC $TGT; do
    out="$TMP/train.tags.tok.$l"
    : >"$out.tmp"
    for c in "${CORPORA[@]}"; do
      log "normalising and tokenising $c.$l"
      textprep_in "$ORIG/$c.$l" normalize -l "$l" --workers "$WORKERS" \
        | textprep tokenize -l "$l" -a --workers "$WORKERS" >>"$out.tmp"
    done
    mv "$out.tmp" "$out"
  done
  same_lines "$TMP/train.tags.tok.$SRC" "$TMP/train.tags.tok.$TGT"
  mark_done train-tok
fi

# 3. valid (newstest2013) and test (newstest2014) -------------------------------------------
if ! step_done test-tok; then
  for l in $SRC $TGT; do
    textprep_in "$ORIG/dev/newstest2013.$l" tokenize -l "$l" -a --workers "$WORKERS" >"$TMP/valid.$l"
    textprep blank-lines --what "valid set" "$TMP/valid.$l"
  done
  # model input and tokenised reference: fairseq's convention (’ -> ');
  # sacreBLEU reference: the segments as released
  textprep_in "$TEST_SRC" segs >"$TMP/test.seg.$SRC"
  textprep_in "$TEST_REF" segs >"$TMP/test.seg.$TGT"
  textprep_in "$TEST_SRC" ref-segs >"$TMP/test.raw.$SRC"
  textprep_in "$TEST_REF" ref-segs >"$TMP/test.raw.$TGT"
  for l in $SRC $TGT; do
    textprep tokenize -l "$l" -a --workers "$WORKERS" <"$TMP/test.seg.$l" >"$TMP/test.$l"
    textprep blank-lines --what "test set" "$TMP/test.raw.$l"
  done
  for s in valid test test.raw; do
    same_lines "$TMP/$s.$SRC" "$TMP/$s.$TGT"
  done
  mark_done test-tok
fi

# 4. joint subwords, then cleaning of the training pairs -------------------------------------
if ! step_done bpe; then
  log "learning $BPE ($BPE_TOKENS) on the training data"
  learn_bpe "$WORK/bpe" "$TMP/train.tags.tok.$SRC" "$TMP/train.tags.tok.$TGT"
  for l in $SRC $TGT; do
    apply_bpe "$WORK/bpe" "$TMP/train.tags.tok.$l" "$TMP/bpe.train.$l"
    apply_bpe "$WORK/bpe" "$TMP/valid.$l" "$WORK/valid.$l"
    apply_bpe "$WORK/bpe" "$TMP/test.$l" "$WORK/test.$l"
    cp "$TMP/test.raw.$l" "$WORK/test.raw.$l"
    cp "$TMP/test.$l" "$WORK/test.tok.$l"
  done
  textprep clean --ratio 1.5 "$TMP/bpe.train" $SRC $TGT "$TMP/train.clean" 1 250
  for l in $SRC $TGT; do
    mv "$TMP/train.clean.$l" "$WORK/train.$l"
  done
  for s in train valid test; do
    same_lines "$WORK/$s.$SRC" "$WORK/$s.$TGT"
  done
  mark_done bpe
fi

# 5. binarise ----------------------------------------------------------------------------------
binarize "$WORK" $SRC $TGT "$DEST"
