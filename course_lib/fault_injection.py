"""Faults caused on purpose, for the tests and benchmarks of what happens when a rank dies,
hangs or is killed in the middle of a save: one environment variable, ``COURSE_LIB_FAULT``,
read where each fault can strike. Unset (always, outside tests), every hook does nothing."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time


def in_save(iteration: int) -> None:
    """``COURSE_LIB_FAULT=kill-in-save@N`` SIGKILLs this process (rank 0, which writes) in
    the middle of the checkpoint save at iteration N: after the adapters, before the
    optimizer state and the state file."""
    fault = os.environ.get("COURSE_LIB_FAULT")
    if fault == f"kill-in-save@{iteration}":
        _inject(fault, 0, signal.SIGKILL)


def maybe_fault(rank: int, where: int | str) -> None:
    """Test hooks, set by ``COURSE_LIB_FAULT``: ``kill-rank-R@N`` SIGKILLs rank R when step
    N starts (a crash); ``stop-rank-R@N`` SIGSTOPs it (a closed laptop: alive but silent);
    ``kill-rank-R@eval-N`` SIGKILLs it as the validation at step N starts (N may be 0).
    (``kill-in-save@N``: :func:`in_save`; ``kill-rank-R@after-Ts``: :func:`arm_timed_fault`.)
    Each prints ``fault injected: ...`` with the time (``time.time()``, seconds) first."""
    fault = os.environ.get("COURSE_LIB_FAULT")
    if fault == f"kill-rank-{rank}@{where}":
        _inject(fault, rank, signal.SIGKILL)
    if fault == f"stop-rank-{rank}@{where}":
        _inject(fault, rank, signal.SIGSTOP)


def arm_timed_fault(rank: int) -> None:
    """Test hook: ``COURSE_LIB_FAULT=kill-rank-R@after-Ts`` SIGKILLs rank R ``T`` seconds
    (a float) after training starts, wherever it then is: in a step, an all-reduce, a
    validation or a save (the soak test's random moment)."""
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
