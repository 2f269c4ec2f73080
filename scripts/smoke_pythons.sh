#!/usr/bin/env bash
# Install ea-fairseq into a fresh venv of each Python version and run scripts/smoke.sh
# there (fairseq-train, fairseq-generate, the hub), timing both; a table at the end.
#
#   bash scripts/smoke_pythons.sh --all              # 3.10 3.11 3.12 3.13
#   bash scripts/smoke_pythons.sh 3.10 3.12          # some of them (X.Y or an interpreter's path)
#
# Options: --work DIR (the venvs; a temporary folder by default, removed at the end),
# --preinstall "REQ ..." (installed into each venv before scripts/install.sh, as a user's
# own packages: e.g. "numpy==1.26.4"; then EA_PINS defaults to missing, so they are kept).
# Interpreters: python3.X on PATH, else ~/.pyenv/versions/3.X.*.
# torch: TORCH_SPEC (torch==2.13.0, the install's default): on Python 3.11 this machine
# has its CPU wheel on disk; elsewhere pip takes the CUDA build from PyPI (about 3 GB
# with its libraries, a minute or two each).
# EA_PINS: all by default (the tested set of constraints.txt), see scripts/install.sh.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/pythons.sh
source "$EA_REPO/scripts/lib/pythons.sh"
EA_STEP=smoke-pythons

versions=()
work=''
preinstall=''
while (($#)); do
  case $1 in
    --all) versions+=(3.10 3.11 3.12 3.13); shift ;;
    --work) [[ $# -ge 2 && -n "$2" ]] || die "--work needs a folder"; work=$2; shift 2 ;;
    --preinstall) [[ $# -ge 2 && -n "$2" ]] || die "--preinstall needs requirements"; preinstall=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) versions+=("$1"); shift ;;
  esac
done
((${#versions[@]})) || die "which Pythons? --all, or versions such as 3.10 3.12"
pythons=()
for v in "${versions[@]}"; do pythons+=("$(find_python "$v")"); done  # all found before any work
if [[ -z "$work" ]]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
export EA_PINS=${EA_PINS:-$([[ -n "$preinstall" ]] && echo missing || echo all)}

rows=()
failed=0
for py in "${pythons[@]}"; do
  v=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
  venv=$work/venv-$v
  rm -rf "$venv"
  log "Python $v ($py): fresh venv $venv"
  t0=$(date +%s)
  "$py" -m venv "$venv"
  if [[ -n "$preinstall" ]]; then
    # shellcheck disable=SC2086  # a list of requirements
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $preinstall
  fi
  if ! EA_PYTHON=$venv/bin/python bash "$EA_REPO/scripts/install.sh" >"$work/install-$v.log" 2>&1; then
    tail -n 30 "$work/install-$v.log" >&2
    rows+=("$v | install FAILED ($(($(date +%s) - t0)) s, log: $work/install-$v.log)")
    failed=1
    continue
  fi
  t_install=$(($(date +%s) - t0))
  t0=$(date +%s)
  if result=$(EA_PYTHON=$venv/bin/python bash "$EA_REPO/scripts/smoke.sh" 2>"$work/smoke-$v.log"); then
    rows+=("$v | install ${t_install} s | smoke $(($(date +%s) - t0)) s | ${result#smoke OK | }")
  else
    tail -n 30 "$work/smoke-$v.log" >&2
    rows+=("$v | install ${t_install} s | smoke FAILED (log: $work/smoke-$v.log)")
    failed=1
  fi
  log "${rows[-1]}"
done
printf '%s\n' "python | install (torch included) | smoke | versions" "${rows[@]}" | tee "$work/summary.txt"
exit "$failed"
