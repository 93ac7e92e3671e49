"""When a rank dies or hangs: the message that names it, and the watchdog that ends a rank
whose peer stopped answering. The test hooks that cause both on purpose are in
:mod:`course_lib.fault_injection`."""

from __future__ import annotations

import os
import sys
import threading
import time

from course_lib.fine_tune.errors import HUNG


def peer_lost_message(group, backend: str, error: Exception | str) -> str:
    rank, size = group.rank(), group.size()
    if size == 2:
        who = f"rank {1 - rank}"
    else:
        who = f"rank {(rank - 1) % size} or rank {(rank + 1) % size} (its neighbours in the ring)"
    return (f"rank {rank}: lost {who} during an all-reduce ({backend} backend: {error}). "
            "That rank died or its machine left the network.")


class Watchdog:
    """Exits this rank when a step takes far too long: a peer that hangs (a closed laptop, a
    stopped process) blocks an all-reduce forever, and neither MPI nor the ring times out.

    ``beat()`` after each step and evaluation; after ``timeout`` seconds without one it
    prints a message and ends the process with exit status 3. ``timeout`` 0 disables it.
    A context manager: it watches from ``__enter__`` until ``__exit__`` (or :meth:`stop`),
    so that a process that goes on after training (a test, a notebook) is not ended.
    """

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank, self.last = timeout, rank, time.monotonic()
        self._stopped = threading.Event()

    def __enter__(self):
        self.beat()
        if self.timeout > 0:
            threading.Thread(target=self._watch, daemon=True, name="watchdog").start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def beat(self):
        self.last = time.monotonic()

    def stop(self):
        self._stopped.set()

    def _watch(self):
        while not self._stopped.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                print(f"rank {self.rank}: no step finished for {self.timeout:.0f} s "
                      "(--step-timeout); another rank is probably stopped or unreachable. "
                      "Exiting; continue later with --resume.", file=sys.stderr, flush=True)
                os._exit(HUNG)
