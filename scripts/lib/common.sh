# shellcheck shell=bash
# Helpers shared by the recipes in scripts/. Source it; it defines functions only
# (and EA_REPO), it runs nothing.

EA_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export EA_REPO

log() { printf '%s | INFO | %s | %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "${EA_STEP:-ea-fairseq}" "$*" >&2; }
die() { printf '%s | ERROR | %s | %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "${EA_STEP:-ea-fairseq}" "$*" >&2; exit 1; }

# Use the Python environment the user already has active (virtualenv or conda),
# or EA_PYTHON if given; otherwise create/activate the project's own venv
# (EA_VENV, default .venv in the repository). Sets PYTHON.
ea_activate_env() {
  if [[ -n "${EA_PYTHON:-}" ]]; then
    PYTHON=$EA_PYTHON
  elif [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
    PYTHON=python
  else
    local venv=${EA_VENV:-$EA_REPO/.venv}
    if [[ ! -x "$venv/bin/python" ]]; then
      command -v python3 >/dev/null || die "python3 not found: install Python 3.8-3.11 first"
      log "creating virtual environment $venv"
      python3 -m venv "$venv" || die "could not create a virtual environment in $venv (Debian: apt-get install python3-venv)"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    PYTHON=python
  fi
  export PYTHON
}

# require_cmd NAME [HINT]: stop with a clear message if a tool is missing.
require_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "required tool '$1' not found${2:+: $2}"
}

# Is the project installed in the active environment (patched fairseq + ea_fairseq)?
ea_installed() {
  "$PYTHON" - "$EA_REPO" <<'PY' >/dev/null 2>&1
import importlib.metadata as md, subprocess, sys
repo = sys.argv[1]
want = subprocess.check_output([sys.executable, f"{repo}/scripts/fairseq_patches.py", "--version"], text=True).strip()
assert md.version("fairseq") == want
md.version("ea-fairseq")
import ea_fairseq  # noqa: F401
PY
}
