#!/usr/bin/env bash
# Every benchmark, one after the other, on an otherwise idle machine (about an hour and a
# half on 2 cores; the real model's runs take most of it).
# Results: benchmarks/results/*.json and *.png; benchmarks/README.md shows the latest tables.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
py="${COURSE_VENV:-../.venv}/bin/python"
echo "== the course's model: MFU, 2 ranks against 1, step anatomy, dtypes"
"$py" real_model.py
echo "== the scored loss's cross-entropy against mlx's"
"$py" cross_entropy.py
echo "== peer_comparison on the course's model"
"$py" peer_comparison.py --model smollm2 --iters 10 --repeats 2
for b in peer_comparison blas all_reduce ring_latency step_anatomy memory rank_metrics sharding exercise_checks; do
    echo "== $b"
    "$py" "$b.py"
done
echo "== peer_comparison under mlx.launch"
"$py" peer_comparison.py --ranks 2 --launcher mlx.launch
