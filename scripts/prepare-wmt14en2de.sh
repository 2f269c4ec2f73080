#!/usr/bin/env bash
# WMT14 English-German: see scripts/prepare-wmt14.sh (same variables).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/prepare-wmt14.sh" en-de
