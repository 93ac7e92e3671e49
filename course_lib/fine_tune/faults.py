"""When a rank dies or hangs: the message that names it, the watchdog that ends a rank
whose peer stopped answering, and the test hooks that cause both on purpose."""

from __future__ import annotations

import os
import sys
import time


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
    """

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank, self.last = timeout, rank, time.monotonic()
        if timeout > 0:
            import threading

            threading.Thread(target=self._watch, daemon=True).start()

    def beat(self):
        self.last = time.monotonic()

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            if time.monotonic() - self.last > self.timeout:
                print(f"rank {self.rank}: no step finished for {self.timeout:.0f} s "
                      "(--step-timeout); another rank is probably stopped or unreachable. "
                      "Exiting; continue later with --resume.", file=sys.stderr, flush=True)
                os._exit(3)


def maybe_fault(rank: int, where: int | str) -> None:
    """Test hooks, set by ``COURSE_LIB_FAULT``: ``kill-rank-R@N`` SIGKILLs rank R when step
    N starts (a crash); ``stop-rank-R@N`` SIGSTOPs it (a closed laptop: alive but silent);
    ``kill-rank-R@eval-N`` SIGKILLs it as the validation at step N starts (N may be 0).
    (``kill-in-save@N``, in the middle of rank 0's checkpoint save, lives in
    :mod:`course_lib.checkpoint`; ``kill-rank-R@after-Ts`` in :func:`arm_timed_fault`.)
    Each prints ``fault injected: ...`` with the time (``time.time()``, seconds) first."""
    import signal

    fault = os.environ.get("COURSE_LIB_FAULT")
    if fault == f"kill-rank-{rank}@{where}":
        _inject(fault, rank, signal.SIGKILL)
    if fault == f"stop-rank-{rank}@{where}":
        _inject(fault, rank, signal.SIGSTOP)


def arm_timed_fault(rank: int) -> None:
    """Test hook: ``COURSE_LIB_FAULT=kill-rank-R@after-Ts`` SIGKILLs rank R ``T`` seconds
    (a float) after training starts, wherever it then is: in a step, an all-reduce, a
    validation or a save (the soak test's random moment)."""
    import re
    import signal
    import threading

    fault = os.environ.get("COURSE_LIB_FAULT", "")
    m = re.fullmatch(rf"kill-rank-{rank}@after-([0-9.]+)s", fault)
    if m:
        timer = threading.Timer(float(m.group(1)), _inject, (fault, rank, signal.SIGKILL))
        timer.daemon = True
        timer.start()


def _inject(fault: str, rank: int, signum: int) -> None:
    print(f"fault injected: {fault}: {signum.name} rank {rank} at {time.time():.3f}",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signum)
