#!/usr/bin/env bash
# The offline install, checked end to end as a GPU machine or a cluster node meets it:
# a fresh venv of the target Python gets its torch (and numpy) first, as that machine
# has them; a wheelhouse is built (scripts/wheelhouse.sh, with the registry); then
# `scripts/install.sh --offline` runs with no index and no network (PIP_NO_INDEX, no pip
# configuration, an unreachable proxy); torch and numpy must be the ones from before,
# and scripts/smoke.sh must pass, still without network.
#
#   bash scripts/check_offline_install.sh                 # Python 3.12, torch 2.11.0, numpy 2.5.2
#   bash scripts/check_offline_install.sh --ci            # CI's light version (see below)
#
# Options: --python X.Y|PATH (3.12), --torch VERSION (2.11.0), --numpy VERSION|none
# (2.5.2: installed first, as on the GPU machines; none: the wheelhouse's), --wheelhouse
# DIR (reuse one built for this Python instead of building), --work DIR (a fresh
# temporary folder; kept with --work), --ci.
# --ci: Python 3.12 with torch 2.14.1 (its CUDA libraries lie on this machine's disk,
# only torch itself is downloaded), installed without triton (unused on a CPU, 0.9 GB)
# while the wheelhouse builds, numpy from the wheelhouse.
# The last lines summarise: wheelhouse size, install time, torch/numpy before and after.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/pythons.sh
source "$EA_REPO/scripts/lib/pythons.sh"
EA_STEP=check-offline

python_arg=3.12 torch_v=2.11.0 numpy_v=2.5.2 wheelhouse='' work='' ci=0
while (($#)); do
  case $1 in
    --python | --torch | --numpy | --wheelhouse | --work)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
      case $1 in
        --python) python_arg=$2 ;;
        --torch) torch_v=$2 ;;
        --numpy) numpy_v=$2 ;;
        --wheelhouse) wheelhouse=$2 ;;
        --work) work=$2 ;;
      esac
      shift 2
      ;;
    --ci) ci=1 torch_v=2.14.1 numpy_v=none; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
py=$(find_python "$python_arg")
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ -z "$work" ]]; then
  work=$(mktemp -d)
  # removed in the background: the venv holds torch's CUDA libraries (~5 GB, ~20 s to delete)
  trap 'rm -rf "$work" &' EXIT
else
  mkdir -p "$work"
fi
venv=$work/venv
rm -rf "$venv"
start=$(date +%s)

# 1. the target: a venv with torch (and numpy) already in it
numpy_note=", numpy $numpy_v"
[[ "$numpy_v" != none ]] || numpy_note=" (numpy: the wheelhouse's)"
log "target: a fresh Python $pyver venv ($venv) with torch $torch_v$numpy_note"
"$py" -m venv "$venv"
VPIP=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
install_torch() {
  if [[ $ci == 1 ]]; then
    # torch's own requirements but triton, at the versions pip resolves for it
    "${VPIP[@]}" install --dry-run --ignore-installed --report "$work/torch.json" "torch==$torch_v"
    "$venv/bin/python" - "$work/torch.json" >"$work/torch.txt" <<'PY'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    m = item["metadata"]
    if m["name"].lower() != "triton":
        print(f"{m['name']}=={m['version']}")
PY
    "${VPIP[@]}" install --no-deps --no-compile -r "$work/torch.txt"
  else
    "${VPIP[@]}" install "torch==$torch_v"
  fi
  if [[ "$numpy_v" != none ]]; then
    "${VPIP[@]}" install "numpy==$numpy_v"
  fi
}

# 2. the wheelhouse (with the registry)
if [[ -n "$wheelhouse" ]]; then
  [[ -f "$wheelhouse/WHEELHOUSE" ]] || die "--wheelhouse $wheelhouse: not made by scripts/wheelhouse.sh"
  install_torch
else
  wheelhouse=$work/wheelhouse
  if [[ $ci == 1 ]]; then  # torch's download and unpacking overlap the fairseq build
    install_torch >"$work/torch.log" 2>&1 &
    torch_pid=$!
    bash "$EA_REPO/scripts/wheelhouse.sh" "$wheelhouse" --python "$py"
    wait "$torch_pid" || { tail -n 20 "$work/torch.log" >&2; die "installing torch $torch_v failed"; }
  else
    install_torch
    bash "$EA_REPO/scripts/wheelhouse.sh" "$wheelhouse" --python "$py"
  fi
fi
# the installed versions, read without importing torch (seconds): torch/version.py has the
# build's full version (2.11.0+cu130, where PyPI's metadata says 2.11.0)
versions() { "$venv/bin/python" -c 'import importlib.metadata as md, importlib.util, os, runpy
try:
    n = md.version("numpy")
except md.PackageNotFoundError:
    n = "none"
t = runpy.run_path(os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "version.py"))
print(t["__version__"], n)'; }
read -r torch_before numpy_before < <(versions)
log "before: torch $torch_before, numpy $numpy_before ($(($(date +%s) - start)) s so far)"

# 3. the offline install, with no index and no way out; Python may write the .pyc files
# of what it imports (--ci installs torch uncompiled: each of the smoke's imports would
# otherwise compile torch again; docs/testing.md)
offline_env=(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PYTHONDONTWRITEBYTECODE PIP_CONFIG_FILE=/dev/null
  PIP_NO_INDEX=1 http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 EA_PYTHON="$venv/bin/python"
  EA_CACHE="$work/no-cache" XDG_CACHE_HOME="$work/no-cache")
t0=$(date +%s)
"${offline_env[@]}" bash "$EA_REPO/scripts/install.sh" --offline "$wheelhouse" 2>&1 | tee "$work/install.log" >&2
t_install=$(($(date +%s) - t0))
read -r torch_after numpy_after < <(versions)
[[ "$torch_after" == "$torch_before" ]] || die "torch changed: $torch_before -> $torch_after"
if [[ "$numpy_v" != none && "$numpy_after" != "$numpy_before" ]]; then
  die "numpy changed: $numpy_before -> $numpy_after"
fi

# 4. the smoke, still offline
t0=$(date +%s)
"${offline_env[@]}" bash "$EA_REPO/scripts/smoke.sh" | tee "$work/smoke.log"
t_smoke=$(($(date +%s) - t0))

wh_mib=$(du -sm "$wheelhouse" | cut -f1)
wh_n=$(find "$wheelhouse" -name '*.whl' | wc -l)
summary="offline install OK | Python $pyver | wheelhouse ${wh_mib} MiB, $wh_n wheels | install ${t_install} s | torch $torch_before -> $torch_after | numpy $numpy_before -> $numpy_after | smoke ${t_smoke} s | total $(($(date +%s) - start)) s"
log "$summary"
printf '%s\n' "$summary"
