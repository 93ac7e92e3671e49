#!/usr/bin/env bash
# Regenerate the stored adapters with the default command: 1 rank, then 2 ranks (mpirun).
# The logs go beside them (train.log). Takes a few minutes on a laptop CPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${COURSE_VENV:-$repo/.venv}/bin/python"
for name in adapters-solo adapters-distributed; do
    rm -rf "adapters/$name.new"
done
"$py" -m course_lib.fine_tune --no-progress --adapter-path adapters/adapters-solo.new \
    | tee adapters/adapters-solo.new.log
bash scripts/mpirun.sh -np 2 "$py" -m course_lib.fine_tune --no-progress \
    --adapter-path adapters/adapters-distributed.new | tee adapters/adapters-distributed.new.log
for name in adapters-solo adapters-distributed; do
    mv "adapters/$name.new.log" "adapters/$name.new/train.log"
    rm -rf "adapters/$name"
    mv "adapters/$name.new" "adapters/$name"
done
echo "wrote adapters/adapters-solo and adapters/adapters-distributed"
