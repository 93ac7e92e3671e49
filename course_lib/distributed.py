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
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx
from mlx.utils import tree_map

BACKENDS = ("auto", "mpi", "ring", "any")


def detect_backend(environ=None) -> str | None:
    """The backend the launcher of this process set up, or None for a lone process.

    ``mpi`` when ``mpirun`` (OpenMPI ``OMPI_COMM_WORLD_SIZE``, MPICH/Hydra ``PMI_SIZE``)
    started us; ``ring`` when ``mlx.launch`` did (``MLX_HOSTFILE`` and ``MLX_RANK``).
    """
    env = os.environ if environ is None else environ
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"
    if "MLX_RANK" in env and "MLX_HOSTFILE" in env:
        return "ring"
    return None


def init_world(backend: str = "auto") -> tuple[mx.distributed.Group, str]:
    """Start the distributed world; return ``(group, backend_name)``.

    ``auto`` uses :func:`detect_backend` and a world of one rank (backend ``"none"``) when
    no launcher started us. ``mpi`` or ``ring`` insist on that backend and raise
    ``RuntimeError`` (with a hint) when it cannot start. ``any`` is MLX's own choice.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = detect_backend() or "none"
        if backend == "none":
            return mx.distributed.init(), "none"
    if backend == "any":
        group = mx.distributed.init()
        return group, ("none" if group.size() == 1 else "any")
    if not mx.distributed.is_available(backend):
        raise RuntimeError(
            f"MLX's {backend} backend is not available here"
            + (": install OpenMPI (scripts/setup.sh does) and start with mpirun"
               if backend == "mpi" else "")
        )
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        hint = ("start the ranks with `mlx.launch -n N ...`" if backend == "ring"
                else "start the ranks with `mpirun -np N ...`")
        raise RuntimeError(f"could not start the {backend} backend ({e}); {hint}") from e
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


def all_sum(x, group: mx.distributed.Group | None = None):
    """Sum of ``x`` (an ``mx.array`` or Python number) over the ranks; an ``mx.array``."""
    group = group or mx.distributed.init()
    x = mx.array(x) if not isinstance(x, mx.array) else x
    return x if group.size() == 1 else mx.distributed.all_sum(x, group=group)


def barrier(group: mx.distributed.Group | None = None) -> None:
    """Wait until every rank gets here (a tiny all-reduce, evaluated)."""
    mx.eval(all_sum(mx.array(1.0), group))
