#!/usr/bin/env bash
# Train an evolving-attention (default) or vanilla Transformer on a prepared benchmark,
# with the hyper-parameters fairseq's recipes use.
#
#   bash scripts/train.sh iwslt14          # transformer_iwslt_de_en recipe
#   bash scripts/train.sh wmt14_en_de      # "Scaling NMT" big recipe (Ott et al., 2018)
#   bash scripts/train.sh wmt14_en_fr      # the same, dropout 0.1
#   bash scripts/train.sh multi30k         # the quickstart's small model (CPU-friendly)
#   bash scripts/train.sh tatoeba          # the same small CPU recipe on data-bin/tatoeba.de-en
#   MODEL=vanilla bash scripts/train.sh iwslt14   # fairseq's transformer, same recipe
#
# Variables (all optional):
#   MODEL        ea | vanilla                                      (ea)
#   ARCH         architecture (default: the benchmark's, with ea_ for MODEL=ea)
#   DATA_BIN     binarised data                (data-bin/<the benchmark's folder>)
#   SAVE_DIR     checkpoints, train.log, tensorboard/              (checkpoints/<bench>/<model>)
#   MAX_TOKENS, UPDATE_FREQ, MAX_UPDATE, MAX_EPOCH, LR, WARMUP, DROPOUT, SEED
#                the recipe's values unless set; WMT's UPDATE_FREQ defaults to
#                128 / (number of GPUs), the "Scaling NMT" effective batch
#   PRECISION    fp16 | bf16 | fp32 on GPU (fp16); always fp32 on CPU
#   NPROC        processes (GPUs) per node                         (all visible GPUs, or 1)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node, through torchrun
#   CPU=1        train on the CPU even if a GPU is there (tiny runs; automatic without GPU)
#   EXTRA_ARGS   more fairseq-train arguments, e.g. "--ea-alpha 0.3 --ea-cross-attn"
#   KEEP_HEAP    on the CPU, keep freed memory in glibc's heap for reuse (1; 0: off)
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

BENCH=${1:-}
EA_STEP=train-$BENCH
MODEL=${MODEL:-ea}
case "$MODEL" in ea | vanilla) ;; *) die "MODEL=$MODEL: expected ea or vanilla" ;; esac

ea_activate_env
require_cmd fairseq-train "run scripts/install.sh"

# --- the recipes ------------------------------------------------------------------------
EVAL_BLEU=()
SAVE=()
case "$BENCH" in
  iwslt14)
    DATA_DIR=iwslt14.tokenized.de-en
    BASE_ARCH=transformer_iwslt_de_en
    : "${MAX_TOKENS:=4096}" "${UPDATE_FREQ:=1}" "${MAX_UPDATE:=60000}" "${LR:=5e-4}" "${WARMUP:=4000}" "${DROPOUT:=0.3}"
    RECIPE=(--share-decoder-input-output-embed --weight-decay 0.0001)
    SAVE=(--keep-last-epochs 10)
    EVAL_BLEU=(--eval-bleu --eval-bleu-args '{"beam": 5, "max_len_a": 1.2, "max_len_b": 10}'
      --eval-bleu-detok moses --best-checkpoint-metric bleu --maximize-best-checkpoint-metric)
    ;;
  wmt14_en_de | wmt14_en_fr)
    DATA_DIR=$BENCH
    if [[ "$BENCH" == wmt14_en_de ]]; then
      BASE_ARCH=transformer_vaswani_wmt_en_de_big
      : "${DROPOUT:=0.3}" "${MAX_UPDATE:=20000}"
    else
      BASE_ARCH=transformer_vaswani_wmt_en_fr_big
      : "${DROPOUT:=0.1}" "${MAX_UPDATE:=40000}"
    fi
    : "${MAX_TOKENS:=3584}" "${LR:=1e-3}" "${WARMUP:=4000}"
    RECIPE=(--share-all-embeddings --warmup-init-lr 1e-07 --weight-decay 0.0)
    SAVE=(--save-interval-updates 1000 --keep-interval-updates 10 --no-epoch-checkpoints)
    ;;
  multi30k | tatoeba)
    if [[ "$BENCH" == multi30k ]]; then DATA_DIR=multi30k.de-en; else DATA_DIR=tatoeba.de-en; fi
    BASE_ARCH=transformer
    # sized for ~9 minutes on 2 CPU cores (the quickstart): d=128, 3+3 layers, 5 epochs
    : "${MAX_TOKENS:=4096}" "${UPDATE_FREQ:=1}" "${MAX_UPDATE:=650}" "${LR:=2e-3}" "${WARMUP:=200}" "${DROPOUT:=0.2}"
    RECIPE=(--share-all-embeddings --weight-decay 0.0001
      --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 128 --decoder-embed-dim 128
      --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
      --encoder-attention-heads 4 --decoder-attention-heads 4)
    SAVE=(--keep-last-epochs 5)
    ;;
  *) die "usage: train.sh iwslt14|wmt14_en_de|wmt14_en_fr|multi30k|tatoeba (got '$BENCH')" ;;
esac

for v in MAX_TOKENS MAX_UPDATE WARMUP; do require_int "$v" 1; done
[[ -z "${UPDATE_FREQ:-}" ]] || require_int UPDATE_FREQ 1
[[ -z "${MAX_EPOCH:-}" ]] || require_int MAX_EPOCH 1
[[ -z "${NPROC:-}" ]] || require_int NPROC 1
DATA_BIN=${DATA_BIN:-$EA_REPO/data-bin/$DATA_DIR}
[[ -f "$DATA_BIN/PREPARED" ]] || die "$DATA_BIN is not a prepared data folder (run scripts/prepare-*.sh first)"
if [[ "$MODEL" == ea ]]; then ARCH=${ARCH:-ea_$BASE_ARCH}; else ARCH=${ARCH:-$BASE_ARCH}; fi
SAVE_DIR=${SAVE_DIR:-$EA_REPO/checkpoints/$BENCH/$MODEL}
mkdir -p "$SAVE_DIR"

# --- devices, precision, launch --------------------------------------------------------------
N_GPU=$(ea_gpu_count)
if [[ "${CPU:-0}" == 1 || "$N_GPU" == 0 ]]; then
  DEVICE=(--cpu)
  NPROC=${NPROC:-1}
  if ea_keep_heap; then
    log "no GPU in use: training on the CPU (fp32), glibc's heap kept for reuse (KEEP_HEAP=0: off)"
  else
    log "no GPU in use: training on the CPU (fp32)"
  fi
else
  NPROC=${NPROC:-$N_GPU}
  case "${PRECISION:-fp16}" in
    fp16) DEVICE=(--fp16) ;;
    bf16) DEVICE=(--bf16) ;;
    fp32) DEVICE=() ;;
    *) die "PRECISION=$PRECISION: expected fp16, bf16 or fp32" ;;
  esac
fi
NNODES=${NNODES:-1}
WORLD=$((NPROC * NNODES))
if [[ -z "${UPDATE_FREQ:-}" ]]; then
  UPDATE_FREQ=$((128 / WORLD))
  ((UPDATE_FREQ >= 1)) || UPDATE_FREQ=1
fi

BPE_KIND=$(sed -n 's/^bpe=//p' "$DATA_BIN/PREPARED")
if [[ ${#EVAL_BLEU[@]} -gt 0 ]]; then
  if [[ "$BPE_KIND" == sentencepiece ]]; then
    EVAL_BLEU+=(--eval-bleu-remove-bpe sentencepiece)
  else
    EVAL_BLEU+=(--eval-bleu-remove-bpe)
  fi
fi
if [[ -t 1 && "${LOG_FORMAT:-}" == "" ]]; then LOG_FORMAT=tqdm; fi

read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
ARGS=(
  "$DATA_BIN" --user-dir "$EA_REPO/ea_fairseq" --arch "$ARCH"
  "${RECIPE[@]}"
  --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0
  --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" --dropout "$DROPOUT"
  --criterion label_smoothed_cross_entropy --label-smoothing 0.1
  --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --max-update "$MAX_UPDATE"
  --seed "${SEED:-1}" --save-dir "$SAVE_DIR" "${SAVE[@]}"
  --log-format "${LOG_FORMAT:-simple}" --log-interval "${LOG_INTERVAL:-100}"
  --log-file "$SAVE_DIR/train.log" --tensorboard-logdir "$SAVE_DIR/tensorboard"
  "${EVAL_BLEU[@]}" "${DEVICE[@]}"
)
[[ -z "${MAX_EPOCH:-}" ]] || ARGS+=(--max-epoch "$MAX_EPOCH")
ARGS+=("${EXTRA[@]}")

log "$ARCH on $DATA_BIN -> $SAVE_DIR ($WORLD process(es), update-freq $UPDATE_FREQ)"
if ((WORLD > 1)); then
  require_cmd torchrun
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}"
    --master_port "${MASTER_PORT:-29500}")
  [[ "${DEVICE[0]:-}" != --cpu ]] || ARGS+=(--distributed-backend gloo)
  exec torchrun --nproc_per_node "$NPROC" "${RDZV[@]}" "$(command -v fairseq-train)" "${ARGS[@]}"
fi
exec fairseq-train "${ARGS[@]}"
