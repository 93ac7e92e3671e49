#!/usr/bin/env bash
# The course's main job, end to end: set-up, then a 2-rank LoRA fine-tune of the default
# model on the sample data under mpirun, then generation with and without the adapter.
# Usage: scripts/demo.sh [extra fine_tune options, e.g. --iters 50]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
venv="${COURSE_VENV:-$repo/.venv}"
py="$venv/bin/python"
out=runs/demo

echo "[demo] building or finding the default model"
model="$("$py" -m course_lib.tiny_model)"

echo "[demo] 2-rank fine-tune: mpirun -np 2 python -m course_lib.fine_tune --adapter-path $out $*"
bash scripts/mpirun.sh -np 2 "$py" -m course_lib.fine_tune --adapter-path "$out" "$@"

prompt="Why is the sky blue?"
echo "[demo] the base model answers: $prompt"
"$py" -m mlx_lm generate --model "$model" --prompt "$prompt" --max-tokens 60 --verbose False 2>/dev/null
echo "[demo] with the adapter:"
"$py" -m mlx_lm generate --model "$model" --adapter-path "$out" --prompt "$prompt" --max-tokens 60 --verbose False 2>/dev/null
echo "[demo] adapters: $repo/$out/adapters.safetensors"
echo "[demo] loss plot: $repo/$out/loss.png   metrics: $repo/$out/metrics.jsonl   summary: $repo/$out/summary.json"
