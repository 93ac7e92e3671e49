"""How many bytes the collectives of a training step move: counted in the process, and
measured on the wire; and what moving them costs on a link (the step-time cost model).

Two ways to count, because they answer different questions:

- :class:`CollectiveCounter` counts the payload of every ``mx.distributed`` collective a
  piece of code *builds* (``all_sum``, ``all_gather``, ``sum_scatter``), MLX's own layers
  included (``ShardedToAllLinear`` and ``sum_gradients`` call ``mx.distributed.all_sum``).
  MLX builds a lazy graph, so the calls are counted when the graph is made, backward pass
  included (``value_and_grad`` runs the vjp functions at once); every one of them is
  evaluated once by the step. Deterministic, any backend.
- :func:`socket_bytes` reads the kernel's TCP counters (``ss -tin``) of a process's
  sockets: what really crossed the wire, for a backend that talks TCP (``ring``, or
  ``mpi`` with ``--mca btl self,tcp``). ``benchmarks/sharding.py`` sets the two side by
  side.

Bytes each rank *sends* for a payload of ``b`` bytes at ``N`` ranks, with the ring
algorithms (Patarasuk and Yuan 2009; the convention of NVIDIA's nccl-tests):
all-reduce ``2(N-1)/N * b``; all-gather of ``b`` bytes from each rank ``(N-1) * b``
(``(N-1)/N`` of the gathered result); reduce-scatter of ``b`` bytes in ``(N-1)/N * b``.
:func:`ring_fraction` and :func:`ring_bytes_sent` are these formulas' one home:
``course_lib.memory`` predicts a step's bytes with them, and :func:`ring_all_reduce_seconds`
turns an all-reduce's bytes into seconds on a link of given bandwidth and latency.
"""

from __future__ import annotations

import re
import subprocess
from contextlib import contextmanager

import mlx.core as mx

OPS = ("all_sum", "all_gather", "sum_scatter")


def ring_fraction(n: int) -> float:
    """``(N-1)/N``: the share of a whole array each of ``n`` ranks sends in one pass round
    the ring, a reduce-scatter of the array or an all-gather into it (an all-reduce is
    both: twice that). 0 for one rank."""
    return (n - 1) / n


def ring_bytes_sent(op: str, payload: float, n: int) -> float:
    """Bytes one rank sends for ``op`` on a ``payload`` (bytes of the array it passes in)
    at ``n`` ranks, with the ring algorithm (see the module docstring). Raises
    ``KeyError`` for an ``op`` not in :data:`OPS` (at two ranks or more)."""
    if n < 2:
        return 0.0
    f = ring_fraction(n)
    return {"all_sum": 2 * f * payload, "all_gather": (n - 1) * payload,
            "sum_scatter": f * payload}[op]


class CollectiveCounter:
    """Counts the collectives built inside :meth:`counting` (see the module docstring).

    ``calls[op]`` and ``payload[op]`` (bytes of the arrays passed in) sum over every
    :meth:`counting` block; :meth:`summary` divides by a number of steps. Works by
    replacing ``mx.distributed.all_sum`` / ``all_gather`` / ``sum_scatter`` for the
    duration of the block (they are looked up on the module at call time, by MLX's layers
    too) and putting them back after.
    """

    def __init__(self):
        self.calls = dict.fromkeys(OPS, 0)
        self.payload = dict.fromkeys(OPS, 0)
        self.ranks = 1

    @contextmanager
    def counting(self):
        saved = {op: getattr(mx.distributed, op) for op in OPS}

        def wrap(op, fn):
            def counted(x, *args, **kwargs):
                group = kwargs.get("group") or mx.distributed.init()
                self.ranks = group.size()
                self.calls[op] += 1
                self.payload[op] += x.nbytes
                return fn(x, *args, **kwargs)
            return counted

        for op, fn in saved.items():
            setattr(mx.distributed, op, wrap(op, fn))
        try:
            yield self
        finally:
            for op, fn in saved.items():
                setattr(mx.distributed, op, fn)

    def summary(self, steps: int = 1) -> dict:
        """Per step: ``{"calls": {op: n}, "payload_bytes": {op: bytes},
        "sent_bytes": bytes one rank sends with the ring algorithms}``."""
        steps = max(steps, 1)
        sent = sum(ring_bytes_sent(op, self.payload[op], self.ranks) for op in OPS)
        return {"calls": {op: self.calls[op] / steps for op in OPS if self.calls[op]},
                "payload_bytes": {op: self.payload[op] / steps for op in OPS
                                  if self.calls[op]},
                "sent_bytes": sent / steps}


_SOCKET = re.compile(r"pid=(\d+),")
_COUNTER = re.compile(r"\b(bytes_acked|bytes_received):(\d+)")


def socket_bytes(pids) -> dict[int, dict[str, int]]:
    """``{pid: {"sent": bytes, "received": bytes}}`` over the established TCP sockets of
    each process in ``pids``, from the kernel's counters (``ss -tinp``; Linux). ``sent``
    is ``bytes_acked`` (what the peer acknowledged: retransmissions counted once), less
    one per socket for the SYN. Raises ``RuntimeError`` when ``ss`` is missing."""
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True,
                             check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"cannot read TCP counters with ss ({e})") from e
    wanted = {int(p) for p in pids}
    totals = {p: {"sent": 0, "received": 0} for p in wanted}
    pairs, head = [], None
    for line in out.splitlines():
        if line[:1].isspace() and head is not None:
            pairs.append((head, line))
            head = None
        else:
            head = line
    for head, detail in pairs:
        m = _SOCKET.search(head)
        if not m or int(m.group(1)) not in wanted:
            continue
        counters = dict((k, int(v)) for k, v in _COUNTER.findall(detail))
        t = totals[int(m.group(1))]
        t["sent"] += max(counters.get("bytes_acked", 1) - 1, 0)
        t["received"] += counters.get("bytes_received", 0)
    return totals


# ----------------------------------------------------------------------------- the cost model

def ring_all_reduce_seconds(n_bytes: float, n: int, bits_per_second: float,
                            latency_seconds: float, calls: int = 1) -> float:
    """Seconds of a ring all-reduce of ``n_bytes`` per rank over ``n`` machines.

    Each machine sends and receives 2(N-1)/N x bytes (:func:`ring_bytes_sent`), in 2(N-1)
    steps that each pay the link's one-way latency (Patarasuk and Yuan, 'Bandwidth optimal
    all-reduce algorithms for clusters of workstations', JPDC 69(2), 2009): ``2(N-1)/N *
    bytes * 8 / bits_per_second + 2(N-1) * latency``. ``calls`` all-reduces that together
    move ``n_bytes`` pay the latency ``calls`` times (``--all-reduce plain`` makes one call
    per gradient array). 0 for one machine.
    """
    if n <= 1:
        return 0.0
    return (ring_bytes_sent("all_sum", n_bytes, n) * 8 / bits_per_second
            + 2 * (n - 1) * latency_seconds * calls)


def predicted_step_seconds(n: int, compute_seconds: float, fixed_seconds: float,
                           n_bytes: float, bits_per_second: float, latency_seconds: float,
                           calls: int = 1) -> float:
    """The cost model of a data-parallel step on ``n`` machines, in seconds:
    ``compute / n + fixed + ring_all_reduce_seconds(...)``. ``compute_seconds`` is the
    1-machine time that splits over machines (forward, backward, data), ``fixed_seconds``
    what every machine repeats (the optimizer update)."""
    return (compute_seconds / n + fixed_seconds
            + ring_all_reduce_seconds(n_bytes, n, bits_per_second, latency_seconds, calls))
