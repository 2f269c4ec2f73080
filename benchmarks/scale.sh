#!/usr/bin/env bash
# The scale grid of issues 24 and 27 (benchmarks/scale.py): vanilla, evolving attention,
# residual attention alone (--ea-alpha 0) and EA + cross-attention at three model sizes
# on Multi30k and Tatoeba De-En, every run trained to convergence by
# benchmarks/quality.sh; per-run summaries committed as they finish; the report in
# results/scale.{json,png}. Plan and timings: docs/scale.md.
#
#   bash benchmarks/scale.sh plan                 # the points, what is done, expected hours
#   bash benchmarks/scale.sh run --jobs 2         # the grid (resumes where it stopped)
#   bash benchmarks/scale.sh run --jobs 2 --only '^multi30k/d64/'   # a part of it
#   bash benchmarks/scale.sh report               # results/scale.json + results/scale.png
#   bash benchmarks/scale.sh --help               # every option
#
# Variables: those of scripts/lib/common.sh's environment (EA_PYTHON, EA_VENV).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
EA_STEP=scale

ea_activate_env
require_python_module matplotlib "pip install matplotlib (scripts/install.sh does)"
require_python_module sacrebleu "run scripts/install.sh"
exec "$PYTHON" "$EA_REPO/benchmarks/scale.py" "$@"
