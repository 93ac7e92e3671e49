#!/usr/bin/env bash
# CI's lane under a Mac's conditions (run by .ci/run as root, after the README's test
# command): the 2-rank tests, the demo and the scripts' tests as a user who is not root
# (nobody runs a workshop as root), every script run by GNU bash 3.2 (macOS's /bin/bash;
# ../shared/tools/bash-3.2), with a PATH as bare as an ssh session's on a Mac.
#
# The user ($COURSE_TEST_USER, default course-student) gets a copy of this checkout in its
# home and its own virtual environment from Debian's /usr/bin/python3: the root lane's
# Python lives under /root/.pyenv, and /root is mode 700. The model cache root built is
# copied over, so the tiny model is not pretrained twice. TMPDIR is the user's own, as on a
# Mac: MLX keeps its compiled CPU kernels in $TMPDIR/mlx, which root's lane made unwritable
# for others in /tmp.
# Usage (as root): bash scripts/test_unprivileged.sh [pytest options]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash32="$repo/../shared/tools/bash-3.2"
user="${COURSE_TEST_USER:-course-student}"
python="${COURSE_TEST_PYTHON:-/usr/bin/python3}"

say() { printf '[unprivileged] %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "scripts/test_unprivileged.sh: run it as root (it makes a user)" >&2; exit 2; }
[ -x "$bash32" ] || { echo "scripts/test_unprivileged.sh: no $bash32 (the CI's bash 3.2)" >&2; exit 2; }

id -u "$user" >/dev/null 2>&1 || { say "creating user $user"; useradd --create-home --shell /bin/sh "$user"; }
home="$(getent passwd "$user" | cut -d: -f6)"
lane="$home/lane"
say "copying the checkout to $lane/main (tracked and untracked files, as git lists them)"
rm -rf "$lane"
mkdir -p "$lane/main" "$lane/shared/tools" "$lane/tmp"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    rsync -a --from0 --ignore-missing-args --files-from=- ./ "$lane/main/")
cp "$bash32" "$lane/shared/tools/bash-3.2"
# `bash` is bash 3.2 for the user, as on a Mac (scripts call each other as `bash x.sh`).
mkdir -p "$lane/bin"
ln -sf "$lane/shared/tools/bash-3.2" "$lane/bin/bash"
cache="${COURSE_LIB_CACHE:-$HOME/.cache/course_lib}"
if [ -d "$cache" ]; then
    mkdir -p "$home/.cache"
    rm -rf "$home/.cache/course_lib"
    cp -a "$cache" "$home/.cache/course_lib"
fi
chown -R "$user:" "$lane" "$home/.cache" 2>/dev/null || chown -R "$user:" "$lane"
# What the package clients need from root's environment (a mirror, a proxy), nothing else.
passed=()
for name in $(env | sed -n 's/^\(PIP_[A-Z_]*\|[a-z]*_proxy\|[A-Z]*_PROXY\)=.*/\1/p'); do
    passed+=("$name=${!name}")
done

say "as $user: bash 3.2 runs scripts/test.sh (set-up with $python, then pytest) on the 2-rank tests and tests/test_scripts.py"
cd "$lane/main"
exec runuser -u "$user" -- env -i HOME="$home" USER="$user" LANG=C.UTF-8 \
    PATH="$lane/bin:/usr/bin:/bin:/usr/sbin:/sbin" PYTHON="$python" TMPDIR="$lane/tmp" \
    ${passed[@]+"${passed[@]}"} \
    COURSE_TEST_BASH="$lane/shared/tools/bash-3.2" \
    "$lane/shared/tools/bash-3.2" scripts/test.sh -p no:cacheprovider \
    -m "distributed or mac_conditions" tests/ "$@"
