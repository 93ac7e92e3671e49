"""Run MLX on an optimized BLAS on Linux CPUs.

The Linux ``mlx-cpu`` wheel links the *reference* BLAS it bundles in ``mlx_cpu.libs``. On
this course's 2-core test machine a 1024x1024 float32 matmul takes ~0.35 s with it and
~0.011 s with OpenBLAS (Debian's ``libopenblas0-pthread``), a ~30x gap; a small LoRA run
goes from minutes to seconds. MLX resolves ``cblas_sgemm`` and friends dynamically, so
preloading OpenBLAS (``LD_PRELOAD``) before MLX is loaded makes every matmul use it.

A process cannot change its own ``LD_PRELOAD`` after start, so the course's entry points
(``python -m course_lib.fine_tune`` and the others) call :func:`reexec_with_fast_blas`
before importing MLX: it re-executes the same command line with ``LD_PRELOAD`` set. Under
``mpirun`` and ``mlx.launch`` every rank does this for itself, so nothing has to be
forwarded to remote hosts.

Opt out with ``COURSE_LIB_FAST_BLAS=0``; point at another library with
``COURSE_LIB_OPENBLAS=/path/to/libopenblas.so``. On macOS MLX uses Accelerate and none of
this applies.

Command line: ``python -m course_lib.blas --report`` prints what a process would use;
``--path`` prints only the library path (empty when none applies);
``--install-kernel VENV`` writes a Jupyter kernel spec that starts with it; ``--matmul``
starts like an entry point and times a 1024x1024 matmul.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys
from pathlib import Path

from course_lib.mpi import find_libmpi

OPT_OUT_VAR = "COURSE_LIB_FAST_BLAS"
OVERRIDE_VAR = "COURSE_LIB_OPENBLAS"
_ACTIVE_VAR = "COURSE_LIB_FAST_BLAS_ACTIVE"  # set in the re-executed process

# Debian/Ubuntu (multiarch) and common other layouts, most preferred first.
_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def bundled_reference_blas() -> str | None:
    """Path of the reference BLAS bundled with the ``mlx-cpu`` wheel, or None.

    Found without importing MLX (importing it would load that BLAS into this process).
    """
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = Path(list(spec.submodule_search_locations)[0]).parent
    hits = sorted(glob.glob(str(site / "mlx_cpu.libs" / "libblas*.so*")))
    return hits[0] if hits else None


def find_optimized_blas() -> str | None:
    """Path of an installed OpenBLAS shared library, or None.

    ``COURSE_LIB_OPENBLAS`` wins when set (and must exist: a wrong path raises
    ``FileNotFoundError`` naming the variable).
    """
    override = os.environ.get(OVERRIDE_VAR)
    if override:
        if not os.path.exists(override):
            raise FileNotFoundError(f"{OVERRIDE_VAR}={override}: no such file")
        return override
    for pattern in _CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def preload_path() -> str | None:
    """The library to preload for MLX in this process, or None when none applies.

    None on macOS, when the opt-out is set, when MLX does not bundle the reference BLAS,
    or when no optimized BLAS is installed.
    """
    if sys.platform != "linux" or os.environ.get(OPT_OUT_VAR, "1") == "0":
        return None
    if bundled_reference_blas() is None:
        return None
    return find_optimized_blas()


def _local_rank_info() -> tuple[int, int]:
    """(rank, ranks on this host) from the launcher's environment; (0, 1) when alone."""
    env = os.environ
    rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", env.get("MLX_RANK", "0"))))
    local = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or env.get("MPI_LOCALNRANKS")
    if local is None and "MLX_HOSTFILE" in env:
        local = str(_ring_ranks_on_this_host(env["MLX_HOSTFILE"]))
    return rank, max(1, int(local or 1))


def _ring_ranks_on_this_host(hostfile: str) -> int:
    """How many ranks of an mlx.launch ring hostfile share this host's first address."""
    try:
        with open(hostfile) as f:
            hosts = json.load(f)
        # mlx.launch writes [["ip:port", ...], ...], one list per rank.
        ip = lambda node: node[0].rsplit(":", 1)[0]
        mine = ip(hosts[int(os.environ.get("MLX_RANK", "0"))])
        return sum(1 for node in hosts if ip(node) == mine) or 1
    except (OSError, ValueError, IndexError, TypeError, KeyError):
        return 1


def fast_blas_env(environ: dict | None = None) -> dict:
    """A copy of ``environ`` (default ``os.environ``) with the optimized BLAS preloaded.

    Also splits the cores between the ranks that share this host: with 2 ranks on 2 cores
    each gets ``OPENBLAS_NUM_THREADS=1`` instead of both starting 2 threads and fighting
    over the cores. An ``OPENBLAS_NUM_THREADS`` already set is kept. Unchanged copy when
    :func:`preload_path` is None.
    """
    env = dict(os.environ if environ is None else environ)
    lib = preload_path()
    if lib is None:
        return env
    parts = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != lib]
    env["LD_PRELOAD"] = ":".join([lib, *parts])
    env[_ACTIVE_VAR] = lib
    if "OPENBLAS_NUM_THREADS" not in env:
        _, local = _local_rank_info()
        env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))
    return env


def ranks_on_this_host() -> int:
    """How many ranks of this job share this host (1 when not launched), read from
    ``mpirun``'s or ``mlx.launch``'s environment."""
    return _local_rank_info()[1]


def _openblas():
    """The OpenBLAS this process preloaded (a ``ctypes.CDLL``), or None: the first
    ``LD_PRELOAD`` entry with ``openblas_get_num_threads``, however it came to be preloaded
    (our re-execution, the Jupyter kernel, a benchmark's or the user's own environment).
    Only a preloaded one: another OpenBLAS in the process (numpy's wheel bundles its own)
    is not the one MLX calls."""
    import ctypes

    for lib in os.environ.get("LD_PRELOAD", "").split(":"):
        if "blas" not in os.path.basename(lib).lower() or not os.path.exists(lib):
            continue
        try:
            handle = ctypes.CDLL(lib)
            handle.openblas_get_num_threads.restype = ctypes.c_int
            return handle
        except (OSError, AttributeError):
            continue
    return None


def blas_threads() -> int | None:
    """Threads each OpenBLAS call of this process may use, or None when MLX does not run
    on the preloaded OpenBLAS (macOS, opted out)."""
    handle = _openblas()
    return None if handle is None else int(handle.openblas_get_num_threads())


def set_blas_threads(n: int) -> int | None:
    """Let each OpenBLAS call use ``n`` threads from now on (``openblas_set_num_threads``);
    returns the previous count, or None (and changes nothing) when MLX does not run on the
    preloaded OpenBLAS. Raises ``ValueError`` for ``n < 1``. Used when one process runs
    several MLX streams at once (``course_lib.fine_tune --streams``): each stream's
    matmuls then get their share of the cores instead of all of them."""
    if n < 1:
        raise ValueError(f"BLAS threads must be at least 1, got {n}")
    handle = _openblas()
    if handle is None:
        return None
    before = int(handle.openblas_get_num_threads())
    handle.openblas_set_num_threads(int(n))
    return before


def reexec_with_fast_blas() -> None:
    """Re-execute this process with the optimized BLAS preloaded, if it applies.

    Call it first thing in an entry point, before anything imports ``mlx``. Returns
    without doing anything when :func:`preload_path` is None, when the environment
    already is what :func:`fast_blas_env` asks for (library preloaded, thread count set:
    OpenBLAS reads it when it loads, so an inherited ``LD_PRELOAD`` without this rank's
    thread share still re-executes once), or when ``mlx.core`` is already imported (then
    it warns, since the BLAS it loaded stays). Prints one notice line on rank 0's stderr
    unless the library was already preloaded. Never returns when it re-executes
    (``os.execve`` keeps the PID, so ``mpirun`` and ``mlx.launch`` still track the rank).
    """
    lib = preload_path()
    if lib is None:
        return
    env = fast_blas_env()
    keys = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS")
    if all(env.get(k) == os.environ.get(k) for k in keys):
        return
    if "mlx.core" in sys.modules:
        print(
            f"course_lib: mlx was imported before the BLAS switch; matmuls use the slow "
            f"reference BLAS. Start Python with LD_PRELOAD={lib} to fix it.",
            file=sys.stderr,
        )
        return
    rank, _ = _local_rank_info()
    if rank == 0 and lib not in os.environ.get("LD_PRELOAD", "").split(":"):
        print(
            f"course_lib: using OpenBLAS ({lib}) instead of MLX's bundled reference BLAS "
            f"({env['OPENBLAS_NUM_THREADS']} thread(s) per rank); "
            f"set {OPT_OUT_VAR}=0 to opt out.",
            file=sys.stderr,
            flush=True,
        )
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def install_kernel(venv: str) -> Path:
    """Write the Jupyter kernel spec ``course-mlx`` into ``VENV/share/jupyter/kernels``.

    The kernel runs this interpreter with the optimized BLAS preloaded (when one applies),
    so notebook cells get fast matmuls too, and with ``MLX_MPI_LIBNAME`` naming the
    environment's Open MPI (:mod:`course_lib.mpi`), so MLX in a notebook finds MPI as it does
    under ``mpirun``. Returns the kernel folder.
    """
    folder = Path(venv) / "share" / "jupyter" / "kernels" / "course-mlx"
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (course-mlx)",
        "language": "python",
        "metadata": {"debugger": True},
    }
    env = {}
    lib = preload_path()
    if lib:
        env.update({"LD_PRELOAD": lib, _ACTIVE_VAR: lib})
    libmpi = find_libmpi(Path(venv).absolute())
    if libmpi:
        env["MLX_MPI_LIBNAME"] = str(libmpi)
    if env:
        spec["env"] = env
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    return folder


def report() -> str:
    """One line saying which BLAS MLX matmuls use in a process started like this one."""
    if sys.platform == "darwin":
        return "blas: macOS, MLX uses Accelerate"
    ref = bundled_reference_blas()
    if ref is None:
        return "blas: MLX does not bundle the reference BLAS here; nothing to switch"
    if os.environ.get(OPT_OUT_VAR, "1") == "0":
        return f"blas: opted out ({OPT_OUT_VAR}=0): reference BLAS {ref}"
    lib = find_optimized_blas()
    if lib is None:
        return (
            f"blas: WARNING no OpenBLAS found, MLX uses the slow reference BLAS {ref}; "
            "install libopenblas0-pthread (Debian/Ubuntu) or set COURSE_LIB_OPENBLAS"
        )
    return f"blas: course entry points preload {lib} (reference BLAS {ref} bypassed)"


def loaded_blas_libraries() -> list[str]:
    """Shared libraries with "blas" in their name mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "blas" in line.lower()}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def time_matmul(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> dict:
    """Seconds per ``n x n`` matmul of ``dtype`` (an ``mx`` dtype's name) on MLX's default
    device (median of ``repeats``, after a warm-up) and the BLAS libraries loaded:
    ``{"seconds", "gflops", "libraries", "openblas_threads"}``; FLOPs counted as 2 n^3."""
    import statistics
    import time

    import mlx.core as mx

    a, b = (mx.random.normal((n, n)).astype(getattr(mx, dtype)) for _ in range(2))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    seconds = statistics.median(times)
    return {"seconds": seconds, "gflops": 2 * n**3 / seconds / 1e9,
            "libraries": loaded_blas_libraries(),
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course_lib.blas", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--report", action="store_true", help="say which BLAS MLX would use")
    group.add_argument("--path", action="store_true", help="print the library to preload, if any")
    group.add_argument("--install-kernel", metavar="VENV", help="write the course-mlx Jupyter kernel")
    group.add_argument("--matmul", action="store_true",
                       help="start like the course's entry points, time a 1024x1024 matmul, "
                       "print JSON")
    args = parser.parse_args(argv)
    if args.matmul:
        reexec_with_fast_blas()
        print(json.dumps(time_matmul()))
    elif args.report:
        print(report())
    elif args.path:
        print(preload_path() or "")
    else:
        print(install_kernel(args.install_kernel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
