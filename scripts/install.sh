#!/usr/bin/env bash
# Install ea-fairseq and a working fairseq 0.12.2 into a Python environment: the one
# named by EA_PYTHON, else the active virtualenv/conda environment, else the
# project's own .venv (created if missing). Safe to re-run: finished steps are skipped.
#
#   bash scripts/install.sh                  # from PyPI (and this machine's caches)
#   bash scripts/install.sh --offline DIR    # from a wheelhouse (scripts/wheelhouse.sh), no index at all
#   bash scripts/install.sh --dry-run        # say what it would keep and install, change nothing
#
# Steps:
#   1. torch: a torch already in the environment that meets setup.py's TORCH_REQUIREMENT
#      is kept, whatever its build (CPU, CUDA); with none, TORCH_SPEC is installed (not
#      with --offline: the wheelhouse holds no torch). Nothing later may replace it.
#   2. ea_fairseq (editable) and its dependencies (setup.py's ranges), with the tested
#      versions of constraints.txt: all of them in the project's own .venv (the
#      test/dev path, CI); in an environment you brought, only for what is not installed
#      yet, so that your numpy etc. stay where they are within range (docs/install.md);
#   3. fairseq 0.12.2 from its hash-checked sdist, patched for Python >= 3.11 / torch >= 2.6
#      / numpy 2 (scripts/fairseq_patches.py), installed with --no-deps; with --offline,
#      the wheel that scripts/wheelhouse.sh built from the same sdist and patches.
#
# Variables (all optional):
#   TORCH_SPEC     the torch to install where none is (torch==2.13.0); set, it also
#                  replaces a torch that does not meet it
#   EA_EXTRAS      extras of ea_fairseq: plot, tensorboard, test (test in the project's
#                  .venv, plot elsewhere; with --offline, the wheelhouse's)
#   EA_PINS        all | missing: which pins of constraints.txt apply (see step 2)
#   EA_CACHE       download cache for the fairseq sdist      (~/.cache/ea-fairseq)
#   FAIRSEQ_SDIST  a local fairseq-0.12.2.tar.gz to use instead of downloading
#   EA_PYTHON / EA_VENV   which Python / which venv (see scripts/lib/common.sh)
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
EA_STEP=install

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; }
offline=''
dry_run=''
while (($#)); do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --offline)
      [[ $# -ge 2 && -n "$2" ]] || die "--offline needs a folder: --offline DIR (made by scripts/wheelhouse.sh)"
      offline=$(cd "$2" 2>/dev/null && pwd) || die "--offline $2: no such folder (make it with scripts/wheelhouse.sh DIR)"
      shift 2
      ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (usage: bash scripts/install.sh [--offline DIR] [--dry-run])" ;;
  esac
done

TORCH_SPEC_DEFAULT=torch==2.13.0
TORCH_SPEC_SET=${TORCH_SPEC:+1}
TORCH_SPEC=${TORCH_SPEC:-$TORCH_SPEC_DEFAULT}
EA_CACHE=${EA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ea-fairseq}
DEPS=$EA_REPO/scripts/lib/deps.py

if [[ -n "$offline" ]]; then
  manifest=$offline/WHEELHOUSE
  [[ -f "$manifest" ]] || die "$offline has no WHEELHOUSE file: not a folder made by scripts/wheelhouse.sh"
  wh() { sed -n "s/^$1=//p" "$manifest"; }
  # Without an environment chosen, do not create a bare .venv that has no torch.
  if [[ -z "${EA_PYTHON:-}${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && ! -x "${EA_VENV:-$EA_REPO/.venv}/bin/python" ]]; then
    hint=""
    if have=$(python3 -c 'import torch, sys; print(sys.executable, torch.__version__)' 2>/dev/null); then
      hint=" python3 (${have% *}) has torch ${have##* }: EA_PYTHON=python3 installs into its environment."
    fi
    die "--offline: no environment chosen. The wheelhouse holds no torch, so install into the Python that has it: set EA_PYTHON=/path/to/python or activate its venv/conda environment.$hint"
  fi
fi

if [[ -n "$dry_run" && -z "${EA_PYTHON:-}${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && ! -x "${EA_VENV:-$EA_REPO/.venv}/bin/python" ]]; then
  log "dry run: would create the virtual environment ${EA_VENV:-$EA_REPO/.venv} with $(command -v python3 || echo 'python3 (not found)'), install $TORCH_SPEC there, then ea_fairseq with every pin of constraints.txt"
  exit 0
fi
ea_activate_env
PIP=("$PYTHON" -m pip --disable-pip-version-check)
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
  || die "$PYTHON does not run"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "Python $pyver: ea-fairseq needs Python 3.10-3.13 (pyenv, or your distribution's python3.1x; EA_PYTHON=/path/to/python3.1x)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info >= (3, 14))' \
  || log "WARNING: Python $pyver is not tested (3.10-3.13 are); fairseq 0.12.2's patches may not cover it"
"${PIP[@]}" --version >/dev/null 2>&1 || die "$PYTHON has no pip (python -m ensurepip, or Debian: apt-get install python3-pip)"
prefix=$("$PYTHON" -c 'import sys; print(sys.prefix)')

# Which pins apply: all of them in the project's own venv (unless it sees the system's
# packages), only for missing packages in an environment the user brought.
own_venv=$(cd "${EA_VENV:-$EA_REPO/.venv}" 2>/dev/null && pwd -P || true)
if [[ -z "${EA_PINS:-}" ]]; then
  if [[ -n "$own_venv" && "$(cd "$prefix" && pwd -P)" == "$own_venv" ]] \
    && ! grep -qs '^include-system-site-packages *= *true' "$prefix/pyvenv.cfg"; then
    EA_PINS=all
  else
    EA_PINS=missing
  fi
fi
case $EA_PINS in
  all) pins_note="the project's environment: every version of constraints.txt applies" ;;
  missing) pins_note="an environment you brought: installed packages within setup.py's ranges are kept, constraints.txt pins what is missing" ;;
  *) die "EA_PINS=$EA_PINS: expected all or missing" ;;
esac
if [[ -n "$offline" ]]; then
  EA_EXTRAS=${EA_EXTRAS-$(wh extras)}
elif [[ "$EA_PINS" == all ]]; then
  EA_EXTRAS=${EA_EXTRAS-test}
else
  EA_EXTRAS=${EA_EXTRAS-plot}
fi
log "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])') ($pins_note)"

INDEX=()
if [[ -n "$offline" ]]; then
  [[ "$(wh python)" == "$pyver" ]] \
    || die "$offline was built for Python $(wh python), this is Python $pyver: build one for it (bash scripts/wheelhouse.sh DIR --python $pyver)"
  INDEX=(--no-index --find-links "$offline")
  # the isolated build of ea_fairseq (setuptools from the wheelhouse) must not look elsewhere either
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$offline
  for e in ${EA_EXTRAS//,/ }; do
    [[ ",$(wh extras)," == *",$e,"* ]] \
      || die "EA_EXTRAS=$EA_EXTRAS: the wheelhouse was built with extras '$(wh extras)' (scripts/wheelhouse.sh DIR --extras $EA_EXTRAS)"
  done
  log "offline: installing from $offline only (no index; built $(wh created) for Python $(wh python), extras '$(wh extras)')"
fi

# 1. torch -------------------------------------------------------------------------
torch_req=$("$PYTHON" "$DEPS" requirements | grep -E '^torch([<>=!~ ]|$)')
torch=$("$PYTHON" "$DEPS" torch)
torch_install=''  # what to pip install, if anything
case $torch in
  ok\ *)
    read -r _ torch_have torch_build <<<"$torch"
    if [[ -n "$TORCH_SPEC_SET" ]] && ! "$PYTHON" "$DEPS" satisfies "$TORCH_SPEC"; then
      [[ -z "$offline" ]] || die "TORCH_SPEC=$TORCH_SPEC: --offline installs no torch (the wheelhouse holds none); install it first"
      log "replacing torch $torch_have ($torch_build build) by TORCH_SPEC=$TORCH_SPEC"
      torch_install=$TORCH_SPEC
    else
      log "keeping torch $torch_have ($torch_build build), already installed: it meets $torch_req. To use another torch, install it first (or set TORCH_SPEC to have this script replace it)"
    fi
    ;;
  missing)
    [[ -z "$offline" ]] \
      || die "no torch in $prefix, and --offline installs none (the wheelhouse holds none): install torch ($torch_req) first, or point EA_PYTHON at the Python that has it"
    log "no torch in this environment: installing $TORCH_SPEC${TORCH_SPEC_SET:+ (TORCH_SPEC)}. To choose another, set TORCH_SPEC (e.g. TORCH_SPEC='torch==2.11.0'), or install your torch first (a CPU or CUDA build from pytorch.org): it will be kept. From PyPI, Linux wheels are CUDA builds (about 3 GB with their libraries)"
    torch_install=$TORCH_SPEC
    ;;
  old\ *)
    torch_have=${torch#old }
    if [[ -n "$TORCH_SPEC_SET" && -z "$offline" ]]; then
      log "torch $torch_have does not meet $torch_req: replacing it by TORCH_SPEC=$TORCH_SPEC"
      torch_install=$TORCH_SPEC
    else
      die "torch $torch_have is installed, but ea-fairseq needs $torch_req: upgrade it yourself (keeping your CPU/CUDA build), or set TORCH_SPEC (e.g. TORCH_SPEC=$TORCH_SPEC_DEFAULT) to let this script replace it${offline:+ (online)}"
    fi
    ;;
  *) die "unexpected answer from $DEPS torch: $torch" ;;
esac
if [[ -n "$dry_run" ]]; then
  log "dry run: would install ${torch_install:-no torch}; then, with extras '$EA_EXTRAS' and pins '$EA_PINS': $("$PYTHON" "$DEPS" requirements --extras "$EA_EXTRAS" --no-torch | tr '\n' ' ')"
  exit 0
fi
[[ -z "$torch_install" ]] || "${PIP[@]}" install "$torch_install"
"$PYTHON" -c 'import torch' 2>/dev/null || die "torch is installed but does not import: $("$PYTHON" -c 'import torch' 2>&1 | tail -n 1)"
"$PYTHON" "$DEPS" satisfies "$torch_req" || die "torch $("$PYTHON" "$DEPS" torch) does not meet $torch_req (TORCH_SPEC=$TORCH_SPEC?)"

# 2. ea_fairseq and its dependencies ---------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
keep=()
[[ "$EA_PINS" == all ]] || keep=(--keep-installed)
"$PYTHON" "$DEPS" constraints "$EA_REPO/constraints.txt" "${keep[@]}" >"$work/constraints.txt"
"$PYTHON" "$DEPS" requirements --extras "$EA_EXTRAS" --no-torch >"$work/requirements.txt"
extras=${EA_EXTRAS:+[$EA_EXTRAS]}
stamp="$prefix/.ea-fairseq-install"
want_stamp="$EA_REPO$extras pins=$EA_PINS $(grep '^torch==' "$work/constraints.txt") $(cat "$EA_REPO/setup.py" "$EA_REPO/constraints.txt" | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] && "$PYTHON" -c 'import importlib.util as u; assert u.find_spec("ea_fairseq")' 2>/dev/null \
  && "$PYTHON" "$DEPS" check --extras "$EA_EXTRAS" >/dev/null 2>&1; then
  log "ea_fairseq$extras already installed (setup.py and constraints.txt unchanged)"
else
  log "installing the dependencies of ea_fairseq$extras"
  "${PIP[@]}" install "${INDEX[@]}" -c "$work/constraints.txt" -r "$work/requirements.txt"
  log "installing ea_fairseq (editable, $EA_REPO)"
  "${PIP[@]}" install "${INDEX[@]}" --no-deps -e "$EA_REPO"
  printf '%s\n' "$want_stamp" >"$stamp"
fi

# 3. fairseq 0.12.2, patched -----------------------------------------------------------
fairseq_want=$("$PYTHON" "$EA_REPO/scripts/fairseq_patches.py" --version)
fairseq_have=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("fairseq"))' 2>/dev/null || true)
if [[ "$fairseq_have" == "$fairseq_want" ]]; then
  log "fairseq $fairseq_have already installed"
elif [[ -n "$offline" ]]; then
  [[ "$(wh fairseq)" == "$fairseq_want" ]] \
    || die "$offline holds fairseq $(wh fairseq), this checkout's patches make $fairseq_want (scripts/fairseq_patches.py changed): rebuild the wheelhouse with scripts/wheelhouse.sh"
  log "installing fairseq $fairseq_want from $offline (--no-deps)"
  "${PIP[@]}" install "${INDEX[@]}" --no-deps "fairseq==$fairseq_want"
else
  sdist=$("$PYTHON" "$DEPS" fairseq-sdist "$EA_CACHE" --sdist "${FAIRSEQ_SDIST:-}") || die "no fairseq sdist (see above)"
  tar -xzf "$sdist" -C "$work"
  "$PYTHON" "$EA_REPO/scripts/fairseq_patches.py" "$work/fairseq-0.12.2"
  # its build needs setuptools, cython and numpy: this environment's own where it has them
  # (the versions it runs with; pip's isolated build fetches the newest first; docs/testing.md)
  build=() how="pip's build isolation"
  if "$PYTHON" -c 'import importlib.util as u, setuptools, Cython, numpy
assert tuple(map(int, setuptools.__version__.split(".")[:2])) >= (70, 1) or u.find_spec("wheel")' 2>/dev/null; then
    build=(--no-build-isolation) how="this environment's setuptools, cython and numpy"
  fi
  log "building and installing fairseq $fairseq_want (with $how; --no-deps)"
  "${PIP[@]}" install --no-deps "${build[@]}" "$work/fairseq-0.12.2"
fi

"$PYTHON" -c 'import fairseq, ea_fairseq, torch, numpy; print("fairseq", fairseq.__version__, "| torch", torch.__version__, "| numpy", numpy.__version__, "| ea_fairseq", ea_fairseq.__version__)' \
  || die "installation finished but 'import fairseq, ea_fairseq' fails"
if ! problems=$("$PYTHON" "$DEPS" check --extras "$EA_EXTRAS"); then
  die "unmet requirements after the install: ${problems//$'\n'/; }"
fi
if [[ "$EA_PINS" == all ]]; then
  # the project's own environment holds nothing else: all of it must be consistent
  "${PIP[@]}" check || die "pip check found broken requirements (see above)"
fi
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  log "done. To use fairseq-train etc. in a new shell: source $VIRTUAL_ENV/bin/activate"
else
  log "done (environment: $prefix)"
fi
