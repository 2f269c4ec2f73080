#!/usr/bin/env bash
# Smoke test of an installed ea-fairseq, as a user runs it: a tiny evolving-attention
# Transformer trained a few updates with fairseq-train, beam search with
# fairseq-generate, and the checkpoint loaded back through the hub
# (EATransformerModel.from_pretrained(...).translate). About 30 s on 2 cores.
#
#   bash scripts/smoke.sh [WORK_DIR]        # WORK_DIR: a fresh temporary folder by default
#
# The environment is chosen as scripts/install.sh chooses it (EA_PYTHON, the active
# venv, or .venv); run the install first. The last line says what ran:
#   smoke OK | python 3.12.1 | torch 2.11.0+cu130 | numpy 2.5.0 | fairseq 0.12.2+ea.… | 12 s
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
EA_STEP=smoke
[[ $# -le 1 ]] || die "usage: bash scripts/smoke.sh [WORK_DIR]"
start=$(date +%s)

if [[ -n "${EA_PYTHON:-}${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" || -x "${EA_VENV:-$EA_REPO/.venv}/bin/python" ]]; then
  ea_activate_env
else
  die "no environment to test: run scripts/install.sh first (or set EA_PYTHON)"
fi
ea_installed || die "ea-fairseq with its patched fairseq is not installed in $("$PYTHON" -c 'import sys; print(sys.prefix)'): run scripts/install.sh"
bin=$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')
for c in fairseq-preprocess fairseq-train fairseq-generate; do
  [[ -x "$bin/$c" ]] || die "$bin/$c not found: fairseq's console scripts are not installed there (run scripts/install.sh)"
done
user_dir=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("ea_fairseq").submodule_search_locations[0])')

if [[ $# -eq 1 ]]; then
  work=$1
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

# a toy task: reverse a sequence of letters
"$PYTHON" - "$work" <<'PY'
import random, sys
rng = random.Random(0)
letters = [chr(ord("a") + i) for i in range(10)]
for split, n in (("train", 600), ("valid", 40), ("test", 20)):
    with open(f"{sys.argv[1]}/{split}.src", "w") as s, open(f"{sys.argv[1]}/{split}.tgt", "w") as t:
        for _ in range(n):
            w = [rng.choice(letters) for _ in range(rng.randint(3, 8))]
            s.write(" ".join(w) + "\n")
            t.write(" ".join(reversed(w)) + "\n")
PY
"$bin/fairseq-preprocess" --source-lang src --target-lang tgt --trainpref "$work/train" \
  --validpref "$work/valid" --testpref "$work/test" --destdir "$work/bin" --joined-dictionary \
  --workers 1 >"$work/preprocess.log" 2>&1 || { tail -n 20 "$work/preprocess.log" >&2; die "fairseq-preprocess failed"; }

"$bin/fairseq-train" "$work/bin" --user-dir "$user_dir" --arch ea_transformer --cpu \
  --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 16 --decoder-embed-dim 16 \
  --encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --encoder-attention-heads 2 \
  --decoder-attention-heads 2 --share-all-embeddings --ea-cross-attn \
  --optimizer adam --lr 1e-3 --max-tokens 1000 --max-update 6 \
  --save-dir "$work/ckpt" --no-epoch-checkpoints --log-format simple --log-interval 1 \
  --num-workers 0 --seed 1 >"$work/train.log" 2>&1 \
  || { tail -n 30 "$work/train.log" >&2; die "fairseq-train failed (log: $work/train.log)"; }
[[ -s "$work/ckpt/checkpoint_last.pt" ]] || die "fairseq-train wrote no checkpoint_last.pt"
grep -q "num_updates 6" "$work/train.log" || grep -q "num_updates\": \"6\"" "$work/train.log" \
  || { tail -n 10 "$work/train.log" >&2; die "fairseq-train did not reach 6 updates"; }

"$bin/fairseq-generate" "$work/bin" --user-dir "$user_dir" --path "$work/ckpt/checkpoint_last.pt" \
  --cpu --beam 4 --batch-size 8 --max-len-b 12 --num-workers 0 >"$work/generate.out" 2>"$work/generate.log" \
  || { tail -n 30 "$work/generate.log" >&2; die "fairseq-generate failed"; }
n_hyp=$(grep -c '^H-' "$work/generate.out" || true)
[[ "$n_hyp" == 20 ]] || die "fairseq-generate: $n_hyp hypotheses for 20 test sentences (see $work/generate.out)"
grep -q '^Generate test with beam=4' "$work/generate.out" || die "fairseq-generate printed no BLEU line"

"$PYTHON" - "$work" "$user_dir" <<'PY' || die "loading the checkpoint through the hub failed"
import sys
from fairseq import utils
from argparse import Namespace
work, user_dir = sys.argv[1:]
utils.import_user_module(Namespace(user_dir=user_dir))
from ea_fairseq.models.ea_transformer import EATransformerModel
hub = EATransformerModel.from_pretrained(f"{work}/ckpt", checkpoint_file="checkpoint_last.pt",
                                         data_name_or_path=f"{work}/bin", cpu=True)
out = hub.translate("a b c d", beam=2, max_len_b=10)
assert isinstance(out, str), out
assert type(hub.models[0]).__name__ == "EATransformerModel", type(hub.models[0])
print(f"hub translate('a b c d') -> {out!r}", file=sys.stderr)
PY

"$PYTHON" - "$(($(date +%s) - start))" <<'PY'
import importlib.metadata as md, importlib.util, os, runpy, sys
# torch/version.py holds the build's full version (2.11.0+cu130: PyPI's metadata says 2.11.0)
torch_v = runpy.run_path(os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "version.py"))
print(f"smoke OK | python {sys.version.split()[0]} | torch {torch_v['__version__']} | numpy {md.version('numpy')} "
      f"| fairseq {md.version('fairseq')} | {sys.argv[1]} s")
PY
