#!/usr/bin/env bash
# mpirun with the flags this machine needs: --allow-run-as-root when run as root (OpenMPI
# refuses root otherwise) and --oversubscribe when asking for more ranks than cores.
# Usage: scripts/mpirun.sh -np N command ...   (any other mpirun options pass through)
set -euo pipefail
flags=()
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
np=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in -np|-n) np="${args[$((i + 1))]}" ;; esac
done
cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu)
[ "$np" -gt "$cores" ] && flags+=(--oversubscribe)
exec mpirun "${flags[@]}" "$@"
