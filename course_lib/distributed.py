"""Start the world of ranks and average gradients across it.

Data-parallel training in one paragraph: every rank (process) holds a full copy of the
model, takes its share of the global batch, and computes gradients on it. An all-reduce
then gives every rank the same averaged gradient, so every rank applies the same update
and the copies stay identical. With N ranks and equal shares, the mean of the per-rank
mean gradients is the gradient of the whole batch (see ``fine_tune`` for the token-count
weighting that keeps this exact when shares hold different numbers of tokens).

Backends (``mx.distributed.init``): ``mpi`` (started by ``mpirun``; OpenMPI over TCP or
shared memory), ``ring`` (started by ``mlx.launch``; MLX's own TCP ring), and on other
hardware ``nccl`` (CUDA) and ``jaccl`` (RDMA over Thunderbolt). ``auto`` picks from the
launcher's environment variables.

CLI (run it under ``mpirun -np N`` or ``mlx.launch -n N``)::

    python -m course_lib.distributed hello        # each rank all_sums rank+1, prints a JSON line
    python -m course_lib.distributed bandwidth    # all_sum time and bandwidth per payload size
"""

from __future__ import annotations

if __name__ == "__main__":  # before MLX loads: see course_lib.blas
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

import json
import os
import socket
import statistics
import sys
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from course_lib.mpi import point_mlx_at_libmpi

BACKENDS = ("auto", "mpi", "ring", "nccl", "any")


def detect_backend(environ=None) -> str | None:
    """The backend the launcher of this process set up, or None for a lone process.

    ``mpi`` when ``mpirun`` (OpenMPI ``OMPI_COMM_WORLD_SIZE``, MPICH/Hydra ``PMI_SIZE``)
    started us; ``ring`` when ``mlx.launch`` did (``MLX_HOSTFILE`` and ``MLX_RANK``);
    ``nccl`` when ``mlx.launch --backend nccl`` did, on NVIDIA GPUs (``MLX_RANK``,
    ``MLX_WORLD_SIZE`` and rank 0's ``NCCL_HOST_IP``, as ``mlx/_distributed_utils/launch.py``
    sets them).
    """
    env = os.environ if environ is None else environ
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"
    if "MLX_RANK" in env and "MLX_WORLD_SIZE" in env and "NCCL_HOST_IP" in env:
        return "nccl"
    if "MLX_RANK" in env and "MLX_HOSTFILE" in env:
        return "ring"
    return None


def whole_lines() -> None:
    """Make this process write its stdout and stderr a whole line at a time.

    ``mpirun`` and ``mlx.launch`` merge every rank's output into one stream. Under
    ``PYTHONUNBUFFERED=1`` (or ``python -u``) Python writes ``print``'s text and its newline
    in two writes, and another rank's line can land between them: two JSON records on one
    line. Line buffering without write-through makes each line one write (lines under the
    8 KiB buffer), which the launchers pass on whole.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError, OSError):
            pass  # not a TextIOWrapper (a notebook's stream, a test's capture): leave it


def exit_on_uncaught_exception() -> None:
    """Make an exception no code catches end this rank at once, with exit status 1 (130 for
    Ctrl-C), after printing its traceback.

    Python's normal exit runs MLX's MPI finalize, which waits for the other ranks; they
    wait in their next collective for this one: the whole job hangs. Ending the process
    without finalizing lets ``mpirun`` see the failed rank and stop the others (and the
    ring's peers see their socket close).
    """
    if getattr(sys.excepthook, "_course_lib", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130 if issubclass(kind, KeyboardInterrupt) else 1)

    hook._course_lib = True
    sys.excepthook = hook


def init_world(backend: str = "auto") -> tuple[mx.distributed.Group, str]:
    """Start the distributed world; return ``(group, backend_name)``.

    ``auto`` uses :func:`detect_backend` and a world of one rank (backend ``"none"``) when
    no launcher started us. ``mpi`` or ``ring`` insist on that backend and raise
    ``RuntimeError`` (with a hint) when it cannot start. ``any`` is MLX's own choice.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    whole_lines()
    if backend == "auto":
        backend = detect_backend() or "none"
        if backend == "none":
            return mx.distributed.init(), "none"
    if backend in ("mpi", "any"):
        point_mlx_at_libmpi()  # the libmpi of the Open MPI that started this rank
    if backend == "any":
        group = mx.distributed.init()
        if group.size() > 1:
            exit_on_uncaught_exception()
        return group, ("none" if group.size() == 1 else "any")
    if not mx.distributed.is_available(backend):
        raise RuntimeError(
            f"MLX's {backend} backend is not available here"
            + (f": MLX could not open Open MPI's libmpi (MLX_MPI_LIBNAME="
               f"{os.environ.get('MLX_MPI_LIBNAME', 'unset')}); bash scripts/setup.sh installs "
               "Open MPI, then start with scripts/mpirun.sh (python -m course_lib.doctor checks)"
               if backend == "mpi" else "")
        )
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        hint = {"ring": "start the ranks with `mlx.launch -n N ...`",
                "nccl": "start the ranks with `mlx.launch --backend nccl -n N ...` on a "
                        "machine with N NVIDIA GPUs and MLX's CUDA build (COURSE_CUDA=1 bash "
                        "scripts/setup.sh)"}.get(backend, "start the ranks with `mpirun -np N ...`")
        raise RuntimeError(f"could not start the {backend} backend ({e}); {hint}") from e
    if group.size() > 1:
        exit_on_uncaught_exception()
    return group, backend


def world() -> mx.distributed.Group:
    """The global group (a world of one when none was started)."""
    return mx.distributed.init()


def rank() -> int:
    """This process's rank in the global group, 0 to world size - 1."""
    return world().rank()


def world_size() -> int:
    """How many ranks the global group has."""
    return world().size()


def is_main() -> bool:
    """True on rank 0, the rank that prints and writes files."""
    return rank() == 0


def print_line(text: str) -> None:
    """Write ``text`` and a newline to stdout in one ``write`` and flush, so the lines of
    ranks sharing ``mpirun``'s output never run into each other (``print`` may split
    them; seen under OpenMPI 4.1 in a few runs in a hundred)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushed, so output under ``mpirun`` arrives in order)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def eprint0(*args, **kwargs) -> None:
    """:func:`print0` to standard error."""
    print0(*args, file=sys.stderr, **kwargs)


def all_reduce_grads(grads, group: mx.distributed.Group | None = None):
    """The element-wise mean of a gradient tree across the ranks of ``group``.

    ``grads`` is any tree (dicts, lists, tuples) of ``mx.array`` leaves of the same shapes
    and dtypes on every rank, such as the trainable-parameter gradients from
    ``nn.value_and_grad``. Returns a tree of the same structure where each leaf is
    ``all_sum(leaf) / world_size``: one all-reduce per array. With a world of one rank the
    same tree comes back untouched. ``group`` defaults to the global group.

    This is the form the course teaches. ``mlx.nn.average_gradients`` computes the same
    mean but concatenates small arrays into buckets of ~32 MiB first, so that a model with
    hundreds of small LoRA matrices makes a few large all-reduce calls instead of hundreds
    of small ones; use it (``--all-reduce bucketed`` in ``fine_tune``) when the per-call
    latency of the network dominates, as it does for LoRA gradients across machines.
    """
    group = group or mx.distributed.init()
    size = group.size()
    if size == 1:
        return grads
    return tree_map(lambda g: mx.distributed.all_sum(g, group=group) / size, grads)


def broadcast(tree, group: mx.distributed.Group | None = None, root: int = 0):
    """Rank ``root``'s tree of arrays on every rank: each rank sends its arrays if it is the
    root and zeros of the same shapes otherwise, and an all-sum adds them up.

    MLX's CPU backends have no broadcast collective, so this costs what an all-reduce of the
    tree costs (2(N-1)/N of its bytes per rank in a ring); a real broadcast sends each byte
    once. Used to start every rank from the same parameters (PyTorch's
    ``DistributedDataParallel`` broadcasts rank 0's module state in its constructor the same
    way) and to send a checkpoint read on rank 0. The tree comes back untouched at one rank.
    Every rank must pass a tree of the same structure, shapes and dtypes, in the same key
    order: the all-sums pair up by the order they are called in.
    """
    group = group or mx.distributed.init()
    if group.size() == 1:
        return tree
    mine = group.rank() == root
    return tree_map(lambda x: mx.distributed.all_sum(x if mine else mx.zeros_like(x),
                                                     group=group), tree)


def broadcast_json(obj, group):
    """Rank 0's JSON-able ``obj`` on every rank (others pass anything, e.g. None): its
    length, then its UTF-8 bytes, in two all-sums (the other ranks add zeros). Used to
    send rank 0's decisions (a checkpoint to continue, whether its outputs started) so that
    every rank agrees, also on an error."""
    if group.size() == 1:
        return obj
    data = json.dumps(obj).encode() if group.rank() == 0 else b""
    n = int(mx.distributed.all_sum(mx.array(len(data)), group=group).item())
    buf = np.frombuffer(data, dtype=np.uint8) if group.rank() == 0 else np.zeros(n, np.uint8)
    total = mx.distributed.all_sum(mx.array(buf.astype(np.int32)), group=group)
    return json.loads(bytes(np.array(total).astype(np.uint8)).decode())


def all_sum(x, group: mx.distributed.Group | None = None):
    """Sum of ``x`` (an ``mx.array`` or Python number) over the ranks; an ``mx.array``."""
    group = group or mx.distributed.init()
    x = mx.array(x) if not isinstance(x, mx.array) else x
    return x if group.size() == 1 else mx.distributed.all_sum(x, group=group)


def barrier(group: mx.distributed.Group | None = None) -> None:
    """Wait until every rank gets here (a tiny all-reduce, evaluated)."""
    mx.eval(all_sum(mx.array(1.0), group))


def hello(group: mx.distributed.Group | None = None) -> dict:
    """Every rank contributes ``rank + 1``; returns what this rank sees after ``all_sum``:
    ``{"rank", "size", "host", "sent", "received"}`` (received = size * (size + 1) / 2)."""
    group = group or mx.distributed.init()
    sent = float(group.rank() + 1)
    received = all_sum(mx.array(sent), group).item()
    return {"rank": group.rank(), "size": group.size(), "host": socket.gethostname(),
            "sent": sent, "received": received}


def measure_all_sum(n_bytes: int, repeats: int = 10, group: mx.distributed.Group | None = None
                    ) -> dict:
    """Median seconds of one ``all_sum`` of a float32 array of ``n_bytes`` bytes.

    Returns ``{"bytes", "seconds", "algorithm_gbps", "bus_gbps"}``: algorithm bandwidth is
    bytes / time; bus bandwidth multiplies it by 2(N-1)/N, the share of the data each rank
    sends and receives in a ring all-reduce (the convention of NVIDIA's nccl-tests), so it
    can be compared with the link's speed. GB/s are 1e9 bytes per second.
    """
    group = group or mx.distributed.init()
    size = group.size()
    x = mx.ones((max(1, n_bytes // 4),), dtype=mx.float32)
    mx.eval(x)
    barrier(group)
    mx.eval(mx.distributed.all_sum(x, group=group))  # warm-up: connections, buffers
    times = []
    for _ in range(repeats):
        barrier(group)
        tic = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(time.perf_counter() - tic)
    seconds = statistics.median(times)
    algorithm = x.nbytes / seconds / 1e9
    return {"bytes": x.nbytes, "seconds": seconds, "algorithm_gbps": algorithm,
            "bus_gbps": algorithm * 2 * (size - 1) / size if size > 1 else float("nan")}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course_lib.distributed")
    parser.add_argument("what", choices=["hello", "bandwidth"])
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB,64MiB",
                        help="payloads for bandwidth, comma separated (KiB, MiB)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    group, backend = init_world(args.backend)
    if args.what == "hello":
        print_line(json.dumps({**hello(group), "backend": backend}))
        return 0
    units = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    for size in args.sizes.split(","):
        number, unit = size[:-3], size[-3:]
        if unit not in units or not number.isdigit():
            parser.error(f"--sizes: {size!r} is not like 4KiB or 16MiB")
        result = measure_all_sum(int(number) * units[unit], args.repeats, group)
        if group.rank() == 0:
            print_line(json.dumps({**result, "world_size": group.size(), "backend": backend}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
