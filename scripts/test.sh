#!/usr/bin/env bash
# Set up, then run the test suite (unit, 2-rank distributed and end-to-end tests).
# Usage: scripts/test.sh [pytest options]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# The set-up also installs Chromium (Linux), for the test that opens every chapter in a browser.
COURSE_BROWSER="${COURSE_BROWSER:-1}" bash scripts/setup.sh
venv="${COURSE_VENV:-$repo/.venv}"
# In-process tests use MLX too: give pytest the optimized BLAS that entry points pick.
lib="$("$venv/bin/python" -m course_lib.blas --path)"
if [ -n "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; fi
exec "$venv/bin/python" -m pytest "$@"
