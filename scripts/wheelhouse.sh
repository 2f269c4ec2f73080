#!/usr/bin/env bash
# Build, on a machine that reaches PyPI, a folder of wheels from which
# `bash scripts/install.sh --offline DIR` installs ea-fairseq with no index at all:
# every package it needs except torch (which the target environment must have), the
# patched fairseq 0.12.2 included (its hash-checked sdist + scripts/fairseq_patches.py,
# built for that Python), and setuptools/wheel for the editable install of ea_fairseq.
#
#   bash scripts/wheelhouse.sh DIR [--python 3.12 | --python /path/to/python] [--extras plot,test]
#
#   --python   the target's Python: X.Y (python3.X.Y on PATH, else ~/.pyenv/versions/X.Y.*)
#              or an interpreter's path; default: python3. Wheels are for this machine's
#              platform (x86-64 Linux here), built against its glibc: build on a machine
#              no newer than the target.
#   --extras   ea_fairseq's extras to include (plot, tensorboard, test); default: none
#
# The versions are constraints.txt's (the tested set). DIR is written whole or not at
# all (a temporary folder renamed at the end); an existing DIR is replaced. DIR/WHEELHOUSE
# records the Python, platform, extras and fairseq version, which install.sh checks.
# Variables: EA_CACHE, FAIRSEQ_SDIST (as in scripts/install.sh).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/pythons.sh
source "$EA_REPO/scripts/lib/pythons.sh"
EA_STEP=wheelhouse

usage="usage: bash scripts/wheelhouse.sh DIR [--python X.Y|PATH] [--extras E1,E2]"
dir=''
python_arg=python3
extras=''
while (($#)); do
  case $1 in
    --python)
      [[ $# -ge 2 && -n "$2" ]] || die "--python needs a version (3.12) or an interpreter's path; $usage"
      python_arg=$2
      shift 2
      ;;
    --extras)
      [[ $# -ge 2 ]] || die "--extras needs a list (plot,tensorboard,test; empty for none); $usage"
      extras=$2
      shift 2
      ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
    -*) die "unknown option '$1'; $usage" ;;
    *)
      [[ -z "$dir" ]] || die "one DIR only (got '$dir' and '$1'); $usage"
      dir=$1
      shift
      ;;
  esac
done
[[ -n "$dir" ]] || die "no DIR given; $usage"

py=$(find_python "$python_arg")
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$py does not run"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "Python $pyver ($py): ea-fairseq needs Python 3.10-3.13"
"$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip (python -m ensurepip, or a venv's python)"
PIP=("$py" -m pip --disable-pip-version-check)
DEPS=$EA_REPO/scripts/lib/deps.py
EA_CACHE=${EA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ea-fairseq}
start=$(date +%s)

dir=$(mkdir -p "$(dirname "$dir")" && cd "$(dirname "$dir")" && pwd)/$(basename "$dir")
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/wheels"
trap 'rm -rf "$tmp"' EXIT
log "building wheels for Python $pyver ($py) into $dir, extras '${extras}'"

# everything but torch, at constraints.txt's versions, for this Python
"$py" "$DEPS" requirements --extras "$extras" --no-torch >"$tmp/requirements.txt"
"$py" "$DEPS" constraints "$EA_REPO/constraints.txt" | grep -v '^torch==' >"$tmp/constraints.txt" || true
printf 'setuptools\nwheel\n' >>"$tmp/requirements.txt"  # the build backend of `pip install -e .`
"${PIP[@]}" wheel --quiet --wheel-dir "$tmp/wheels" -c "$tmp/constraints.txt" -r "$tmp/requirements.txt" \
  || die "pip wheel failed (see above)"

# fairseq 0.12.2, patched, built for this Python
fairseq_want=$("$py" "$EA_REPO/scripts/fairseq_patches.py" --version)
sdist=$("$py" "$DEPS" fairseq-sdist "$EA_CACHE" --sdist "${FAIRSEQ_SDIST:-}") || die "no fairseq sdist (see above)"
mkdir "$tmp/src"
tar -xzf "$sdist" -C "$tmp/src"
"$py" "$EA_REPO/scripts/fairseq_patches.py" "$tmp/src/fairseq-0.12.2" >&2
log "building fairseq $fairseq_want for Python $pyver"
"${PIP[@]}" wheel --quiet --no-deps --wheel-dir "$tmp/wheels" "$tmp/src/fairseq-0.12.2" || die "building fairseq failed (see above)"
if ls "$tmp/wheels"/torch-* >/dev/null 2>&1; then
  die "a torch wheel got into the wheelhouse (a dependency asks for torch?): $(ls "$tmp/wheels"/torch-*)"
fi

{
  echo "python=$pyver"
  echo "platform=$("$py" -c 'import sysconfig; print(sysconfig.get_platform())')"
  echo "extras=$extras"
  echo "fairseq=$fairseq_want"
  echo "created=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "built_with=$py $("$py" -c 'import sys; print(sys.version.split()[0])')"
} >"$tmp/wheels/WHEELHOUSE"
rm -rf "$dir"
mv "$tmp/wheels" "$dir"
n=$(find "$dir" -name '*.whl' | wc -l)
size=$(du -sm "$dir" | cut -f1)
log "wrote $dir: $n wheels, ${size} MiB, for Python $pyver, in $(($(date +%s) - start)) s"
log "install it, in the target environment (which must have torch): bash scripts/install.sh --offline $dir"
