"""One rank of an exercise's check (started by ``core.run_ranks``; not for learners).

    python -m course_lib.exercises.harness NAME LEARNER_FILE FUNCTION OUT_DIR

Each rank builds the exercise's arguments, computes the course's solution and every typical
wrong answer (all of them, on every rank, in the same order: they may call collectives), then
the learner's function, and writes ``OUT_DIR/rank{r}.json``: ``{"passed": ..., "message":
...}``. An exception in the learner's code (or, said as such, in the check's own) is written
to ``rank{r}.error.json`` with its line in the learner's function, and the rank exits 1 at
once (``mpirun`` then ends the others, rather than leaving them waiting in a collective).
Both files are written whole or not at all.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

import numpy as np


def exercise(name: str):
    """The :class:`~course_lib.exercises.core.Exercise` named ``chN.name``."""
    module, attr = name.split(".")
    return getattr(importlib.import_module(f"course_lib.exercises.{module}"), attr)


def as_numpy(x):
    """A result as NumPy values, tuples and lists kept (MLX arrays evaluated)."""
    import mlx.core as mx

    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
    if isinstance(x, (tuple, list)):
        return type(x)(as_numpy(v) for v in x)
    if isinstance(x, dict):
        return {k: as_numpy(v) for k, v in x.items()}
    if isinstance(x, (bool, int, float, np.number, np.ndarray)):
        return np.asarray(x)
    return x


def describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape}" if x.shape else "a number"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(str, x))}"
    return f"a {type(x).__name__}"


def compare(got, want, rtol: float, atol: float) -> tuple[bool, str, float]:
    """``(equal, what differs, largest relative difference)``."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return False, f"your function returned {describe(got)}; the answer is {describe(want)}", 1.0
        worst = 0.0
        for k, w in want.items():
            ok, why, rel = compare(got[k], w, rtol, atol)
            if not ok:
                return False, f"{k!r}: {why}", rel
            worst = max(worst, rel)
        return True, "", worst
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return False, f"your function returned {describe(got)}; the answer is {describe(want)}", 1.0
        worst = 0.0
        for i, (g, w) in enumerate(zip(got, want)):
            ok, why, rel = compare(g, w, rtol, atol)
            if not ok:
                return False, f"item {i}: {why}", rel
            worst = max(worst, rel)
        return True, "", worst
    if isinstance(want, np.ndarray):
        if not isinstance(got, np.ndarray) or got.dtype == object:
            return False, f"your function returned {describe(got)}; the answer is {describe(want)}", 1.0
        if got.shape != want.shape:
            return (False, f"shape {got.shape} where the answer has shape {want.shape}", 1.0)
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-12)
        rel = float(diff.max(initial=0.0)) / scale
        ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
        return ok, "" if ok else f"differs from the answer by up to {rel:.2g} (relative)", rel
    ok = got == want
    return bool(ok), "" if ok else f"{got!r} where the answer is {want!r}", 0.0 if ok else 1.0


def learner_error(e: BaseException, learner: Path, header_lines: int) -> str:
    """``your function raised NameError: ... (line 3 of your function)``."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(learner)]
    where = f" (line {frames[-1].lineno - header_lines} of your function)" if frames else ""
    text = f"your function raised {type(e).__name__}: {e}{where}"
    if isinstance(e, NotImplementedError):
        text = "not done yet: the stub still raises NotImplementedError; write your code in it"
    elif isinstance(e, NameError):
        text += (": define what it needs inside the function, or import it there (the "
                 "check runs your function on its own, away from the notebook)")
    return text


def write(path: Path, obj: dict) -> None:
    """A rank's finding, written whole or not at all (a rank may be ended mid-write)."""
    from course_lib.atomic import write_json
    write_json(path, obj)


def judge(ex, got, want, wrong, args) -> dict:
    """``{"passed", "message"}`` for the learner's result ``got``."""
    try:
        ok, why, rel = compare(got, want, ex.rtol, ex.atol)
    except (TypeError, ValueError) as e:
        return {"passed": False, "message": f"your function returned {describe(got)}, which "
                                            f"the check cannot compare with the answer ({e})"}
    if ok:
        return {"passed": True, "message": ex.explain(got, want, args, rel)}
    mistake = next((message for w, message in wrong
                    if compare(got, w, ex.rtol, ex.atol)[0]), None)
    return {"passed": False, "message": mistake or why}


def main(argv: list[str]) -> int:
    name, learner, fn_name, out = argv[0], Path(argv[1]), argv[2], Path(argv[3])
    ex = exercise(name)
    rank = 0
    try:
        group, size = None, 1
        if ex.ranks > 1:
            from course_lib.distributed import init_world
            group, _ = init_world("mpi")
            rank, size = group.rank(), group.size()
        args = ex.make_args(rank, size, group)
        want = as_numpy(ex.reference(*args))
        wrong = [(as_numpy(m(*args)), message) for m, message in ex.mistakes]
    except Exception as e:  # the course's side: say so, in one line
        fail(out, rank, ex, f"the check itself failed before running your function "
                            f"({type(e).__name__}: {e}); please report it")

    from course_lib.exercises.core import HEADER
    namespace = {"__name__": "learner"}
    try:
        exec(compile(learner.read_text(), str(learner), "exec"), namespace)
        got = as_numpy(namespace[fn_name](*args))
    except BaseException as e:  # the learner's code: any exception is a message
        # The stub raises on every rank alike: which rank wrote first does not matter.
        where = f"rank {rank}: " if ex.ranks > 1 and not isinstance(e, NotImplementedError) else ""
        fail(out, rank, ex, where + learner_error(e, learner, HEADER.count("\n") + 1))
    try:
        result = judge(ex, got, want, wrong, args)
    except Exception as e:
        fail(out, rank, ex, f"the check itself failed on your result ({type(e).__name__}: "
                            f"{e}); please report it")
    write(out / f"rank{rank}.json", result)
    return 0


def fail(out: Path, rank: int, ex, message: str):
    """Write ``message`` as this rank's error and exit at once (``mpirun`` then ends the
    other ranks rather than leaving them waiting in a collective)."""
    write(out / f"rank{rank}.error.json", {"message": message})
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
