#!/usr/bin/env bash
# The two-host lab: two network hosts on this Linux machine (network namespaces joined by
# a veth pair, an sshd in each, a shaped link), to run the course across "machines" for
# real. Needs root. Everything it makes, `down` removes.
#
#   sudo bash scripts/two_host_lab.sh check            # can it run here?
#   sudo bash scripts/two_host_lab.sh up [--shape wifi]
#   sudo bash scripts/two_host_lab.sh shape ethernet-1g   # thunderbolt | ethernet-1g | wifi | none
#   sudo bash scripts/two_host_lab.sh status
#   sudo bash scripts/two_host_lab.sh mpirun -- python -m course_lib.fine_tune --iters 20
#   sudo bash scripts/two_host_lab.sh mlx-launch -- python -m course_lib.fine_tune --iters 20
#   sudo bash scripts/two_host_lab.sh exec b -- hostname
#   sudo bash scripts/two_host_lab.sh own b "$PWD"     # host b gets its own empty folder here (docs/WORKSHOP.md)
#   sudo bash scripts/two_host_lab.sh down
#
# It is `python -m course_lib.lab` (see its --help and the module's docstring).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COURSE_VENV:-$repo/.venv}"
[ -x "$venv/bin/python" ] || { echo "no $venv: run scripts/setup.sh first" >&2; exit 1; }
cd "$repo"
exec "$venv/bin/python" -m course_lib.lab "$@"
