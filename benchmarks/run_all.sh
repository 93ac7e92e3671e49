#!/usr/bin/env bash
# Every benchmark, one after the other, on an otherwise idle machine (~35 minutes on 2 cores).
# Results: benchmarks/results/*.json and *.png; benchmarks/README.md shows the latest tables.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
py="${COURSE_VENV:-../.venv}/bin/python"
for b in peer_comparison blas all_reduce step_anatomy memory sharding; do
    echo "== $b"
    "$py" "$b.py"
done
echo "== peer_comparison under mlx.launch"
"$py" peer_comparison.py --ranks 2 --launcher mlx.launch
