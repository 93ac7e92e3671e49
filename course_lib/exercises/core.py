"""An exercise: its task, its stub, its hint, its solution, and the check that runs the
learner's function the way the course runs its own code.

The learner writes a function in a notebook cell and calls ``exercise.check(fn)``. The check
takes the function's source (``inspect.getsource``), runs it in a fresh process (under
``mpirun -np 2`` for a distributed exercise: ``harness.py``), on inputs the exercise builds,
next to the course's own solution and the typical wrong answers, and prints one line:
correct (with the number that shows it), or which mistake the result looks like, or what went
wrong (a syntax error, an exception with its line, a wrong shape, a rank that never finished).
Never a traceback from inside the checker.

The idea of ``check()``, ``hint()`` and ``solution()`` comes from Kaggle Learn's
``learntools``; the distributed exercises follow Stanford CS336's assignment 2, where small
adapter functions are checked on real ranks.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import tempfile
import textwrap
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

#: The imports the learner's function may use without importing them itself (a notebook's
#: first cell imports the same names).
HEADER = """import math
import mlx.core as mx
import mlx.nn as nn
import numpy as np
"""
TIMEOUT_S = 60.0


@dataclass
class Verdict:
    """What a check found: ``passed`` and the one line shown to the learner."""

    passed: bool
    message: str
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.passed:
            return "Correct: " + self.message
        # The stub's own message already says "not done yet".
        return self.message if self.message.startswith("not done yet") else "Not yet: " + self.message


@dataclass
class Exercise:
    """One exercise.

    ``name`` is ``"ch1.gradient"``-like (the module and the attribute learners call);
    ``ranks`` is 1 (run in one fresh process) or 2 (``mpirun -np 2``). ``make_args(rank,
    size, group)`` builds the arguments of the learner's function on each rank (``group``
    is ``None`` at 1 rank); ``reference`` is the course's answer (``solution()`` prints
    it); ``mistakes`` the typical wrong answers, as functions, each with the message meant
    for it; ``explain(got, want, args, rel)`` says what is correct (``rel``: the largest
    relative difference). The reference and the mistakes run from this package on every
    rank; only the learner's function runs from its source, with :data:`HEADER`'s imports."""

    name: str
    title: str
    ranks: int
    make_args: Callable
    reference: Callable
    stub: Callable
    hint_text: str
    explain: Callable
    mistakes: list[tuple[Callable, str]] = field(default_factory=list)
    rtol: float = 1e-4
    atol: float = 1e-6

    # What a learner calls ------------------------------------------------------------

    def check(self, fn: Callable, timeout: float = TIMEOUT_S) -> None:
        """Run ``fn`` and print one line: correct, or what is wrong."""
        print(self.verdict(fn, timeout=timeout))

    def hint(self) -> None:
        print(f"Hint ({self.name}): {self.hint_text}")

    def solution(self) -> None:
        """Print the course's solution (its source)."""
        print(textwrap.dedent(inspect.getsource(self.reference)))

    # The check --------------------------------------------------------------------------

    def verdict(self, fn: Callable, timeout: float = TIMEOUT_S) -> Verdict:
        """The :class:`Verdict` for the learner's ``fn`` (what :meth:`check` prints)."""
        start = time.monotonic()
        v = self._verdict(fn, timeout)
        v.seconds = time.monotonic() - start
        return v

    def _verdict(self, fn: Callable, timeout: float) -> Verdict:
        source = learner_source(fn)
        if isinstance(source, Verdict):
            return source
        with tempfile.TemporaryDirectory(prefix="course-exercise-") as tmp:
            tmp = Path(tmp)
            (tmp / "learner.py").write_text(HEADER + "\n" + source)
            outcome = run_ranks(self, tmp, fn.__name__, timeout)
            if outcome is not None:
                return outcome
            results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(self.ranks)]
        return combine(results, self.ranks)


def learner_source(fn) -> str | Verdict:
    """The source of the learner's function, or a :class:`Verdict` saying why there is none."""
    if not callable(fn):
        return Verdict(False, f"check() takes your function itself, not {type(fn).__name__}: "
                              "pass its name without calling it, e.g. check(my_function)")
    if getattr(fn, "__name__", "") == "<lambda>":
        return Verdict(False, "write your answer as a def function, not a lambda")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return Verdict(False, f"cannot read the source of {fn!r}: define it with def in a "
                              "notebook cell (or a file) and run that cell first")
    except (SyntaxError, tokenize.TokenError) as e:   # its file changed since it was run
        return Verdict(False, f"syntax error in your function: {e.args[0]}")
    try:
        compile(source, "your function", "exec")
    except SyntaxError as e:
        return Verdict(False, f"syntax error on line {e.lineno} of your function: {e.msg}")
    return source


def run_ranks(ex: Exercise, tmp: Path, fn_name: str, timeout: float) -> Verdict | None:
    """Run the harness on ``ex.ranks`` ranks; ``None`` when every rank wrote its result."""
    from course_lib.launch import child_env, python_module

    cmd = python_module("course_lib.exercises.harness", ex.name, tmp / "learner.py", fn_name, tmp)
    if ex.ranks > 1:
        from course_lib.mpi import MPIError, mpirun_command
        try:
            cmd = mpirun_command(ex.ranks, *cmd)
        except MPIError as e:
            return Verdict(False, f"cannot start {ex.ranks} ranks: {e}")
    env = child_env(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")
    from course_lib.mpi import _die_with_parent
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        return hung(ex, tmp, timeout)
    except BaseException:       # Ctrl-C or a kernel interrupt: leave no rank behind
        stop(proc)
        raise
    missing = [r for r in range(ex.ranks) if not (tmp / f"rank{r}.json").exists()]
    if missing:
        errors = earliest_error(tmp, ex.ranks)
        if errors:
            return errors
        tail = " ".join(out.strip().splitlines()[-2:])[-300:]
        return Verdict(False, f"rank {missing[0]} stopped without a result (exit status "
                              f"{proc.returncode}): {tail}")
    return None


def stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """End a check's process and its ranks: SIGTERM to ``mpirun`` (which ends the ranks it
    started, each in a process group of its own), SIGKILL to the group ``grace`` seconds
    later if anything is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def earliest_error(tmp: Path, ranks: int) -> Verdict | None:
    """The first rank's error message, skipping a file cut short by a rank ended mid-write."""
    for r in range(ranks):
        f = tmp / f"rank{r}.error.json"
        try:
            return Verdict(False, json.loads(f.read_text())["message"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def hung(ex: Exercise, tmp: Path, timeout: float) -> Verdict:
    error = earliest_error(tmp, ex.ranks)
    if error is not None:
        return Verdict(False, error.message + " (and the other rank then waited for it "
                              "forever)")
    waiting = [r for r in range(ex.ranks) if not (tmp / f"rank{r}.json").exists()]
    what = (f"rank {waiting[0]} never finished" if ex.ranks > 1 and len(waiting) < ex.ranks
            else "your function never returned")
    hint = (": a collective (all_sum) that one rank calls and another does not waits "
            "forever" if ex.ranks > 1 else ": is there a loop that never ends?")
    return Verdict(False, f"{what} within {timeout:.0f} s{hint}")


def combine(results: list[dict], ranks: int) -> Verdict:
    """One line from every rank's finding: the first rank that is wrong speaks."""
    for r, res in enumerate(results):
        if not res["passed"]:
            where = f"rank {r}: " if ranks > 1 else ""
            return Verdict(False, where + res["message"])
    return Verdict(True, results[0]["message"])

