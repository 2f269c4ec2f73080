# shellcheck shell=bash
# find_python X.Y|PATH: print the interpreter for a Python version (python3.X on PATH if
# it runs, else the newest ~/.pyenv/versions/X.Y.*) or check a given path. Needs
# common.sh (die). Used by wheelhouse.sh, smoke_pythons.sh, check_offline_install.sh.
find_python() {
  local want=$1 py
  if [[ "$want" =~ ^3\.[0-9]+$ ]]; then
    py=$(command -v "python$want" || true)
    if [[ -z "$py" ]] || ! "$py" -c '' 2>/dev/null; then  # a pyenv shim runs only where selected
      py=$(find "${PYENV_ROOT:-$HOME/.pyenv}/versions" -maxdepth 3 -path "*/versions/$want.*/bin/python" 2>/dev/null \
        | sort -V | tail -n 1)
    fi
    [[ -n "$py" ]] || die "Python $want: no python$want on PATH and none in ${PYENV_ROOT:-$HOME/.pyenv}/versions; give its path"
  else
    py=$(command -v "$want" || true)
    [[ -n "$py" && -x "$py" ]] || die "$want: not a Python interpreter (give X.Y or a path)"
  fi
  "$py" -c '' 2>/dev/null || die "$py does not run"
  printf '%s\n' "$py"
}
