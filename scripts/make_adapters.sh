#!/usr/bin/env bash
# Regenerate the stored adapters with the default command (the course's model and recipe):
# 1 rank, then 2 ranks (mpirun). Each run's output goes beside its adapters as train.log.
# The checkpoints (NNNNNNN_*) are removed afterwards: the final adapter, metrics, summary
# and plot are what the course reads, and the checkpoints' optimizer state would triple
# the repository's size. About 8 minutes on a 2-core laptop CPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${COURSE_VENV:-$repo/.venv}/bin/python"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

run() {  # run NAME COMMAND...: fresh adapters/NAME from COMMAND, with its log
    local name="$1"; shift
    rm -rf "adapters/$name"
    "$@" --no-progress --adapter-path "adapters/$name" | tee "$log"
    cp "$log" "adapters/$name/train.log"
    rm -f "adapters/$name"/[0-9][0-9][0-9][0-9][0-9][0-9][0-9]_* "adapters/$name/.fine_tune.lock"
}
run adapters-solo "$py" -m course_lib.fine_tune
run adapters-distributed bash scripts/mpirun.sh -np 2 "$py" -m course_lib.fine_tune
echo "wrote adapters/adapters-solo and adapters/adapters-distributed"
