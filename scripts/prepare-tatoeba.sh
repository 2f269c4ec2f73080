#!/usr/bin/env bash
# Tatoeba German-English (everyday sentences; CC BY 2.0 FR), cased: Moses tokenisation
# without lowercasing, joint BPE 8k, fairseq-preprocess with a joined dictionary
# (scripts/prepare-parallel.sh); sacreBLEU scores against the raw test text, as given.
#   train 161,810 pairs; valid 2,000; test 3,001 (the split of ../shared/data/tatoeba-de-en).
# Output: data-bin/tatoeba.de-en.
#
#   bash scripts/prepare-tatoeba.sh
#   TATOEBA_DIR=/path/to/tatoeba-de-en bash scripts/prepare-tatoeba.sh
#
# The recipe needs the split files, {train,valid,test}.{de,en}.gz (UTF-8, one sentence a
# line, the sides line-aligned), and downloads nothing: Tatoeba's official exports
# (tatoeba.org's sentence and link lists, and manythings.org's deu-eng.zip made from them)
# change every week, and the project's split (of manythings.org's file of 2018-05-13,
# made so that no German or English sentence occurs in two splits) cannot be rebuilt
# from a newer download. ../shared/data/tatoeba-de-en holds it (see its README).
#
# Variables (all optional):
#   TATOEBA_DIR    the folder with the split files, read only
#                  ($EA_SHARED_DATA/tatoeba-de-en, default ../shared/data/tatoeba-de-en)
#   TRAIN_LINES    use only the first N training pairs (0 = all)                  (0)
#   WORK, DEST, BPE, BPE_TOKENS (8000), WORKERS, FORCE: as in prepare-parallel.sh
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
EA_STEP=prepare-tatoeba

SRC=de
TGT=en
NAME=tatoeba.de-en
SHARED_DATA=${EA_SHARED_DATA:-$EA_REPO/../shared/data}
CORPUS_DIR=${TATOEBA_DIR:-$SHARED_DATA/tatoeba-de-en}
CORPUS_URL=
DIR_VAR=TATOEBA_DIR
DIR_HINT="the Tatoeba De-En split of ../shared/data/tatoeba-de-en, see scripts/prepare-tatoeba.sh"
SPLITS="train=train valid=valid test=test"
SUFFIX=.gz
LOWERCASE=0
BPE_TOKENS=${BPE_TOKENS:-8000}
TRAIN_LINES=${TRAIN_LINES:-0}
RECIPE_SETTINGS="train_lines=$TRAIN_LINES cased"
SACREBLEU_REF="test.raw.$TGT: test.$TGT.gz as given (cased, untokenised)"

# shellcheck source=scripts/prepare-parallel.sh
source "$EA_REPO/scripts/prepare-parallel.sh"
