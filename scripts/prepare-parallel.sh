#!/usr/bin/env bash
# A parallel corpus that comes split into train / valid / test files, one sentence per
# line and the two sides line-aligned, from a local folder (or downloaded from a base
# address): the recipe behind prepare-multi30k.sh and prepare-tatoeba.sh, and usable on
# its own for any corpus in that layout.
#   1. read each file (gzipped or plain UTF-8), stopping at invalid UTF-8 with the file
#      and line; optionally only the first TRAIN_LINES training pairs; training pairs
#      with a whitespace-only side dropped, such lines of valid/test kept (they stay
#      aligned with the references), with a warning either way; line counts checked;
#   2. Moses tokenisation (sacremoses, as tokenizer.perl -l LANG), case kept unless
#      LOWERCASE=1 (then lowercase.perl after it, as fairseq's IWSLT14 recipe);
#   3. joint BPE learned on the training text of both sides, applied to every split;
#   4. fairseq-preprocess with a joined dictionary into DEST, beside the tokenised test
#      text (tokenised BLEU) and the raw test text (sacreBLEU's reference: the file as
#      given, lowercased when LOWERCASE=1).
# Output: data-bin/$NAME.
#
#   CORPUS_DIR=~/corpora/de-en NAME=mine.de-en bash scripts/prepare-parallel.sh
#
# Variables:
#   CORPUS_DIR   the folder with the split files, read only (required unless CORPUS_URL
#                is set: then unset means "download them to $CACHE/$NAME")
#   SRC, TGT     the languages: the files' last suffix before SUFFIX          (de, en)
#   SPLITS       the file stem of each split                   ("train=train valid=valid test=test")
#   SUFFIX       what follows the language: .gz (gzipped) or empty (plain text)       (.gz)
#   CORPUS_URL   base address to fetch missing files from (unset: nothing is downloaded)
#   NAME         name of the data-bin and work folders                     (corpus.$SRC-$TGT)
#   LOWERCASE    1: lowercase the text after tokenisation, and the sacreBLEU reference (0)
#   TRAIN_LINES  use only the first N training pairs (0 = all)                          (0)
#   CACHE        download cache                                             (work/downloads)
#   DOWNLOAD_DIR where downloaded files go                                  ($CACHE/$NAME)
#   WORK         intermediate files                                         (work/$NAME)
#   DEST         the prepared corpus                                        (data-bin/$NAME)
#   BPE          subword-nmt | sentencepiece                                 (subword-nmt)
#   BPE_TOKENS   joint BPE merges (subword-nmt) or pieces (sentencepiece)           (8000)
#   WORKERS      processes for tokenisation, BPE and fairseq-preprocess          (nproc)
#   OFFLINE=1    never download;  FORCE=1  redo every step
#
# A wrapper (prepare-multi30k.sh, prepare-tatoeba.sh) sets these variables and sources
# this file; it may also set DIR_VAR (the name of its folder variable, for messages),
# DIR_HINT (what its folder must hold, and where to get it), RECIPE_SETTINGS (what else
# shapes the output, for the step fingerprints), SACREBLEU_REF (what the reference is)
# and EA_STEP.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

SRC=${SRC:-de}
TGT=${TGT:-en}
NAME=${NAME:-corpus.$SRC-$TGT}
EA_STEP=${EA_STEP:-prepare-$NAME}
DIR_VAR=${DIR_VAR:-CORPUS_DIR}
SPLITS=${SPLITS:-train=train valid=valid test=test}
SUFFIX=${SUFFIX-.gz}
CACHE=${CACHE:-$EA_REPO/work/downloads}
DOWNLOAD_DIR=${DOWNLOAD_DIR:-$CACHE/$NAME}
LOCAL_COPY=${CORPUS_DIR:+1}  # a folder the user names is their own copy: read, never downloaded into
if [[ -z "${CORPUS_DIR:-}" ]]; then
  [[ -n "${CORPUS_URL:-}" ]] || die "$DIR_VAR is not set: name the folder holding the corpus's split files${DIR_HINT:+ ($DIR_HINT)}"
  CORPUS_DIR=$DOWNLOAD_DIR
fi
WORK=${WORK:-$EA_REPO/work/$NAME}
DEST=${DEST:-$EA_REPO/data-bin/$NAME}
BPE=${BPE:-subword-nmt}
BPE_TOKENS=${BPE_TOKENS:-8000}
WORKERS=${WORKERS:-$(nproc)}
TRAIN_LINES=${TRAIN_LINES:-0}
LOWERCASE=${LOWERCASE:-0}
require_int TRAIN_LINES 0
require_int BPE_TOKENS 1
require_int WORKERS 1
[[ "$LOWERCASE" == 0 || "$LOWERCASE" == 1 ]] || die "LOWERCASE=$LOWERCASE: expected 0 or 1"
for v in SRC TGT; do
  [[ "${!v}" =~ ^[A-Za-z0-9_-]+$ ]] || die "$v=${!v}: expected a language code (letters, digits, '_' or '-')"
done
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "NAME=$NAME: expected letters, digits, '.', '_' or '-'"
case "$SUFFIX" in "" | .gz) ;; *) die "SUFFIX=$SUFFIX: expected .gz or nothing (plain text)" ;; esac
RECIPE_SETTINGS=${RECIPE_SETTINGS:-train_lines=$TRAIN_LINES lowercase=$LOWERCASE}
if [[ "$LOWERCASE" == 1 ]]; then CASED=(--lowercase) CASE_NOTE=", lowercased"; else CASED=() CASE_NOTE=""; fi
TMP=$WORK/tmp
MARKERS=$WORK/.done

# split name in this recipe -> file stem in the corpus
declare -A STEM=()
for pair in $SPLITS; do
  split=${pair%%=*}
  case "$split" in train | valid | test) ;; *) die "SPLITS='$SPLITS': '$pair' is not train=, valid= or test=" ;; esac
  [[ "$pair" == *=?* ]] || die "SPLITS='$SPLITS': '$pair' names no file stem"
  STEM[$split]=${pair#*=}
done
for s in train valid test; do
  [[ -n "${STEM[$s]:-}" ]] || die "SPLITS='$SPLITS': no $s= file stem"
done
SACREBLEU_REF=${SACREBLEU_REF:-test.raw.$TGT: ${STEM[test]}.$TGT$SUFFIX as given, untokenised$CASE_NOTE}
src_file() { printf '%s/%s.%s%s' "$CORPUS_DIR" "${STEM[$1]}" "$2" "$SUFFIX"; }
INPUTS=()
for s in train valid test; do
  for l in $SRC $TGT; do
    INPUTS+=("$(src_file "$s" "$l")")
  done
done
if [[ -n "$LOCAL_COPY" ]]; then
  [[ -d "$CORPUS_DIR" ]] || die "$DIR_VAR=$CORPUS_DIR: no such folder${DIR_HINT:+ ($DIR_HINT)}"
  for f in "${INPUTS[@]}"; do
    [[ -s "$f" ]] || die "$DIR_VAR=$CORPUS_DIR: $(basename "$f") is missing or empty (a local copy needs" \
      "{${STEM[train]},${STEM[valid]},${STEM[test]}}.{$SRC,$TGT}$SUFFIX${CORPUS_URL:+; leave $DIR_VAR unset to download them to $DOWNLOAD_DIR}${DIR_HINT:+; $DIR_HINT})"
  done
fi

recipe_start

# read_text FILE: its text on stdout (gunzipped for SUFFIX=.gz)
read_text() {
  if [[ "$SUFFIX" == .gz ]]; then gzip -dc "$1"; else cat "$1"; fi
}

if ! step_done tok; then
  if [[ -z "$LOCAL_COPY" ]]; then
    for s in train valid test; do
      for l in $SRC $TGT; do
        fetch "$CORPUS_URL/${STEM[$s]}.$l$SUFFIX" "$(src_file "$s" "$l")"
      done
    done
    record_inputs
  fi
  for s in train valid test; do
    for l in $SRC $TGT; do
      f=$(src_file "$s" "$l")
      read_text "$f" | textprep --input-name "$f" utf8 >"$TMP/$s.raw.$l.tmp" || die "could not read $f (see above)"
      if [[ ! -s "$TMP/$s.raw.$l.tmp" ]]; then
        [[ -n "$LOCAL_COPY" ]] || die "$f: no text in it (a broken download? delete it to fetch it again)"
        die "$f: no text in it"
      fi
      if [[ "$s" == train && "$TRAIN_LINES" -gt 0 ]]; then
        head -n "$TRAIN_LINES" "$TMP/$s.raw.$l.tmp" >"$TMP/$s.raw.$l.head"
        mv "$TMP/$s.raw.$l.head" "$TMP/$s.raw.$l.tmp"
      fi
      if [[ "$s" != train ]]; then
        textprep --input-name "$f" blank-lines --what "$s set" "$TMP/$s.raw.$l.tmp"
      fi
      mv "$TMP/$s.raw.$l.tmp" "$TMP/$s.raw.$l"
    done
    a=$(n_lines "$TMP/$s.raw.$SRC")
    b=$(n_lines "$TMP/$s.raw.$TGT")
    [[ "$a" == "$b" ]] || die "line counts differ: $(src_file "$s" "$SRC") has $a lines," \
      "$(src_file "$s" "$TGT") has $b (the sides of a corpus are line-aligned)"
    if [[ "$s" == train ]]; then
      # as the cleaning step of fairseq's recipes: no training pair with an empty side
      textprep --input-name "$CORPUS_DIR/${STEM[train]}.{$SRC,$TGT}$SUFFIX" drop-blank "$TMP/train.raw" "$SRC" "$TGT" \
        "$TMP/train.nonblank"
      for l in $SRC $TGT; do mv "$TMP/train.nonblank.$l" "$TMP/train.raw.$l"; done
    fi
    for l in $SRC $TGT; do
      textprep tokenize -l "$l" "${CASED[@]}" --workers "$WORKERS" <"$TMP/$s.raw.$l" >"$TMP/$s.$l.tmp"
      mv "$TMP/$s.$l.tmp" "$TMP/$s.$l"
    done
    same_lines "$TMP/$s.$SRC" "$TMP/$s.$TGT"
  done
  mark_done tok
fi

if ! step_done bpe; then
  subword_splits
  for l in $SRC $TGT; do
    if [[ "$LOWERCASE" == 1 ]]; then
      textprep lowercase <"$TMP/test.raw.$l" >"$WORK/test.raw.$l.tmp"
    else
      cp "$TMP/test.raw.$l" "$WORK/test.raw.$l.tmp"
    fi
    mv "$WORK/test.raw.$l.tmp" "$WORK/test.raw.$l"
  done
  mark_done bpe
fi

binarize "$WORK" "$SRC" "$TGT" "$DEST"
