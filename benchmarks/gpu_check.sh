#!/usr/bin/env bash
# GPU acceptance check in one command, for a machine with one GPU and no network (a lent
# GPU, a cluster node): install ea-fairseq offline into the Python that has the GPU's
# torch, then run benchmarks/gpu_check.py (fused vs eager on CUDA in fp32/fp16/bf16,
# fairseq-train --fp16 / --bf16 on Multi30k, cost.py in fp16 and bf16), all into
# results/gpu_check.json. Without a GPU it says so in its last line and exits 0.
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with the registry and ../shared: what to carry
#   bash benchmarks/gpu_check.sh [gpu_check.py options]   # there
#
# --prepare builds the wheelhouse for Python 3.12 (scripts/wheelhouse.sh), Multi30k's
# data-bin (scripts/prepare-multi30k.sh) and a copy of the IWSLT14 BPE'd test set, and
# prints the paths to carry with the working tree and their size.
#
# Variables: EA_PYTHON (the Python to install into and run; default python3), WHEELS
# (the wheelhouse, work/gpu/wheels), GPU_PYTHON (the wheelhouse's Python, 3.12),
# EA_SHARED_DATA (../shared/data).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
EA_STEP=gpu-check
WHEELS=${WHEELS:-$EA_REPO/work/gpu/wheels}
SHARED=${EA_SHARED_DATA:-$(cd "$EA_REPO/.." && pwd)/shared/data}
COST_DATA=$EA_REPO/work/gpu/iwslt14_bpe10k
cd "$EA_REPO"

if [[ "${1:-}" == --prepare ]]; then
  [[ $# -eq 1 ]] || die "--prepare takes no other arguments"
  ea_activate_env
  bash scripts/wheelhouse.sh "$WHEELS" --python "${GPU_PYTHON:-3.12}"
  MULTI30K_DIR=${MULTI30K_DIR:-$SHARED/multi30k} bash scripts/prepare-multi30k.sh
  [[ -s "$SHARED/iwslt14/fairseq_bpe10k/test.de" ]] || die "$SHARED/iwslt14/fairseq_bpe10k/test.de not found (EA_SHARED_DATA)"
  mkdir -p "$COST_DATA"
  cp "$SHARED/iwslt14/fairseq_bpe10k/test.de" "$SHARED/iwslt14/fairseq_bpe10k/test.en" "$COST_DATA/"
  carry=(work/gpu/wheels data-bin/multi30k.de-en work/gpu/iwslt14_bpe10k)
  log "carry these with the working tree ($(du -csh "${carry[@]}" | tail -n 1 | cut -f1) in all):"
  printf '  %s\n' "${carry[@]}" >&2
  log "then run there: bash benchmarks/gpu_check.sh"
  exit 0
fi

PYTHON=${EA_PYTHON:-python3}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine ($PYTHON: torch missing or torch.cuda.is_available() is False); nothing was checked"
  exit 0
fi
if ! "$PYTHON" -c 'import ea_fairseq, fairseq' 2>/dev/null; then
  [[ -d "$WHEELS" ]] || die "ea_fairseq is not installed and $WHEELS is missing (run --prepare where the registry is, and carry it)"
  EA_PYTHON=$PYTHON bash scripts/install.sh --offline "$WHEELS"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
