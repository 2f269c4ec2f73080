#!/usr/bin/env bash
# Install ea-fairseq and a working fairseq 0.12.2 into the active Python environment
# (or into .venv, created if no virtualenv/conda environment is active).
#
#   bash scripts/install.sh
#
# Steps, each skipped when already done (safe to re-run):
#   1. torch, pinned (TORCH_SPEC): first, so that nothing resolves an unpinned torch;
#   2. ea_fairseq (editable) with its pinned dependencies, which include the ones
#      fairseq needs at run time;
#   3. fairseq 0.12.2 from its hash-checked sdist, patched for Python 3.11 /
#      torch >= 2.6 / numpy 2 (scripts/fairseq_patches.py), built with pip's build
#      isolation and installed with --no-deps;
#   4. EA's one-pass CPU kernels (decoding steps, training maps), a small C++ file, compiled if a compiler is
#      there (optional: see ea_fairseq/modules/step_kernel.py).
#
# Variables (all optional):
#   TORCH_SPEC     pip requirement for torch            (torch==2.13.0)
#   EA_EXTRAS      extras of ea_fairseq to install      (test)
#   EA_CACHE       download cache                       (~/.cache/ea-fairseq)
#   FAIRSEQ_SDIST  a local fairseq-0.12.2.tar.gz to use instead of downloading
#   EA_PYTHON / EA_VENV   which Python / which venv (see scripts/lib/common.sh)
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
EA_STEP=install

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EA_EXTRAS=${EA_EXTRAS:-test}
EA_CACHE=${EA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ea-fairseq}
FAIRSEQ_URL=https://files.pythonhosted.org/packages/30/36/db42846570f479ac859be3b48d8b47f2ae9b0b9c77487a512f2f2ecbcb6b/fairseq-0.12.2.tar.gz
FAIRSEQ_SHA256=34f1b18426bf3844714534162f065ab733e049597476daa35fffb4d06a92b524

ea_activate_env
PIP=("$PYTHON" -m pip --disable-pip-version-check)
log "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# 1. torch -------------------------------------------------------------------------
torch_want=${TORCH_SPEC#torch==}
torch_have=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [[ -n "$torch_have" && "${torch_have%%+*}" == "$torch_want" ]]; then
  log "torch $torch_have already installed"
else
  log "installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
# Any later resolution must keep this torch.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PYTHON" -c 'import torch; print("torch==" + torch.__version__)' >"$constraints"

# 2. ea_fairseq and its pinned dependencies ------------------------------------------
extras=${EA_EXTRAS:+[$EA_EXTRAS]}
prefix=$("$PYTHON" -c 'import sys; print(sys.prefix)')
stamp="$prefix/.ea-fairseq-install"
want_stamp="$EA_REPO$extras $(cat "$constraints") $("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$EA_REPO/setup.py")"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] && "$PYTHON" -c 'import ea_fairseq' 2>/dev/null; then
  log "ea_fairseq$extras already installed (setup.py unchanged)"
else
  log "installing ea_fairseq$extras (editable) and its pinned dependencies"
  "${PIP[@]}" install -c "$constraints" -e "$EA_REPO$extras"
  printf '%s\n' "$want_stamp" >"$stamp"
fi

# 3. fairseq 0.12.2, patched -----------------------------------------------------------
fairseq_want=$("$PYTHON" "$EA_REPO/scripts/fairseq_patches.py" --version)
fairseq_have=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("fairseq"))' 2>/dev/null || true)
if [[ "$fairseq_have" == "$fairseq_want" ]]; then
  log "fairseq $fairseq_have already installed"
else
  sdist=${FAIRSEQ_SDIST:-$EA_CACHE/fairseq-0.12.2.tar.gz}
  if [[ ! -f "$sdist" ]]; then
    [[ -z "${FAIRSEQ_SDIST:-}" ]] || die "FAIRSEQ_SDIST=$FAIRSEQ_SDIST: no such file"
    mkdir -p "$EA_CACHE"
    log "downloading $FAIRSEQ_URL"
    "$PYTHON" - "$FAIRSEQ_URL" "$sdist.part" <<'PY'
import sys, urllib.request
urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
PY
    mv "$sdist.part" "$sdist"
  fi
  have_sha=$("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$sdist")
  if [[ "$have_sha" != "$FAIRSEQ_SHA256" ]]; then
    die "$sdist: sha256 $have_sha, expected $FAIRSEQ_SHA256 (delete it to download again)"
  fi
  build=$(mktemp -d)
  trap 'rm -f "$constraints"; rm -rf "$build"' EXIT
  tar -xzf "$sdist" -C "$build"
  "$PYTHON" "$EA_REPO/scripts/fairseq_patches.py" "$build/fairseq-0.12.2"
  log "building and installing fairseq $fairseq_want (build isolation on, --no-deps)"
  "${PIP[@]}" install --no-deps "$build/fairseq-0.12.2"
fi

"$PYTHON" -c 'import fairseq, ea_fairseq, torch; print("fairseq", fairseq.__version__, "| torch", torch.__version__, "| ea_fairseq", ea_fairseq.__version__)' \
  || die "installation finished but 'import fairseq, ea_fairseq' fails"
"${PIP[@]}" check || die "pip check found broken requirements (see above)"

# 4. EA's one-pass CPU kernels (ea_fairseq/csrc/ea_step.cpp), built now rather than
# on the first use. Optional: without a C++ compiler, decoding and training use PyTorch ops.
if [[ "${EA_FAIRSEQ_STEP_KERNEL:-auto}" == off ]]; then
  log "EA_FAIRSEQ_STEP_KERNEL=off: not building EA's one-pass CPU kernels"
elif lib=$("$PYTHON" -c 'from ea_fairseq.modules import step_kernel; print(step_kernel.build())' 2>&1); then
  log "EA's one-pass CPU kernels: ${lib##*$'\n'}"
else
  log "WARNING: EA's one-pass CPU kernels were not built, CPU decoding and training will use PyTorch ops (a few per cent slower):"
  printf '%s\n' "$lib" | tail -n 5 >&2
fi
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  log "done. To use fairseq-train etc. in a new shell: source $VIRTUAL_ENV/bin/activate"
else
  log "done (environment: $prefix)"
fi
