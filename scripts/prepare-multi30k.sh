#!/usr/bin/env bash
# Multi30k (task 1) German-English: the quickstart's small real corpus.
# Same steps as the IWSLT14 recipe: Moses tokenisation + lowercasing, joint BPE,
# fairseq-preprocess with a joined dictionary (scripts/prepare-parallel.sh, with
# LOWERCASE=1: the project's Multi30k results are on lowercased text, and stay so).
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
NAME=multi30k.de-en
CORPUS_URL=${MULTI30K_URL:-https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw}
CACHE=${CACHE:-$EA_REPO/work/downloads}
DOWNLOAD_DIR=$CACHE/multi30k
CORPUS_DIR=${MULTI30K_DIR:-}
DIR_VAR=MULTI30K_DIR
DIR_HINT=
SPLITS="train=train valid=val test=test_2016_flickr"
SUFFIX=.gz
LOWERCASE=1
BPE_TOKENS=${BPE_TOKENS:-6000}
TRAIN_LINES=${TRAIN_LINES:-0}
RECIPE_SETTINGS="train_lines=$TRAIN_LINES"
SACREBLEU_REF="test.raw.$TGT: test_2016_flickr.$TGT.gz as released, lowercased (the data are lowercased)"

# shellcheck source=scripts/prepare-parallel.sh
source "$EA_REPO/scripts/prepare-parallel.sh"
