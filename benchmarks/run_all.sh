#!/usr/bin/env bash
# Every benchmark, one after the other, on an otherwise idle machine (~15 minutes on 2 cores).
# Results: benchmarks/results/*.json and *.png; copy the printed tables into README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
py="${COURSE_VENV:-../.venv}/bin/python"
for b in peer_comparison blas all_reduce step_anatomy memory; do
    echo "== $b"
    "$py" "$b.py"
done
