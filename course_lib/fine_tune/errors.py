"""The fine-tune's errors and its exit statuses, decided here and nowhere else.

Exit statuses of ``python -m course_lib.fine_tune`` (``workshop run`` and the tests read
them): 0 done; :data:`USAGE` bad input, or ``--adapter-path`` in use by a live run;
:data:`HUNG` no step for ``--step-timeout`` seconds; :data:`PEER_LOST` a ring peer's
connection dropped; :data:`WRITE_FAILED` an output could not be written; 128 + N stopped
by signal N (130 Ctrl-C, 143 SIGTERM), the shell's convention.
"""

from __future__ import annotations

from course_lib.atomic import WriteError
from course_lib.data import DataError

USAGE = 2
HUNG = 3
PEER_LOST = 4
WRITE_FAILED = 5


class UsageError(ValueError):
    """Bad options or inputs, found before anything is written (exit status 2)."""


def stopped_by(signum: int) -> int:
    """The exit status of a run stopped by signal ``signum``: 128 + ``signum``."""
    return 128 + int(signum)


def exit_status(error: BaseException) -> int:
    """The exit status for ``error``: :data:`USAGE` for :class:`UsageError` and
    :class:`course_lib.data.DataError`, :data:`WRITE_FAILED` for
    :class:`course_lib.atomic.WriteError`, the status an exception carries
    (``exit_status``: :class:`~course_lib.fine_tune.interrupts.Interrupted`,
    :class:`~course_lib.fine_tune.interrupts.StoppedByRankZero`), 130 for a
    ``KeyboardInterrupt``. Raises ``TypeError`` for an error the fine-tune does not end
    with a status of its own."""
    if isinstance(error, (UsageError, DataError)):
        return USAGE
    if isinstance(error, WriteError):
        return WRITE_FAILED
    if isinstance(error, KeyboardInterrupt):
        return stopped_by(2)
    if isinstance(getattr(error, "exit_status", None), int):
        return error.exit_status
    raise TypeError(f"no exit status for {type(error).__name__}")
