#!/usr/bin/env bash
# Run the project's tests (CPU only): installs first if needed, then pytest.
#
#   bash scripts/test.sh [pytest arguments]     (e.g. -k hydra, -x, -n 0)
#
# Variables: EA_SHARED_DATA (real corpora used by the recipe tests, default
# ../shared/data beside the repository) and those of scripts/install.sh.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
EA_STEP="test"

bash "$EA_REPO/scripts/install.sh"
ea_activate_env
export EA_SHARED_DATA=${EA_SHARED_DATA:-$(cd "$EA_REPO/.." && pwd)/shared/data}
cd "$EA_REPO"
# A worker per core (pytest-xdist): a module's tests run on one worker, so a trained model
# or prepared corpus that they share is built once; the slow modules start first
# (tests/conftest.py orders them; xdist would otherwise reorder modules by test count).
# `-n 0` runs everything in this process.
parallel=(-n auto --dist loadfile --no-loadscope-reorder)
for a in "$@"; do
  case $a in -n | -n* | --numprocesses* | --dist* | no:xdist) parallel=() ;; esac
done
log "running the tests ($PYTHON -m pytest ${parallel[*]})"
exec "$PYTHON" -m pytest tests "${parallel[@]}" "$@"
