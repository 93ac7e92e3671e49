"""Experiments on the two-host lab: one fine-tune whose link changes shape while it runs.

:func:`run_shape_blocks` is how ``benchmarks/lab_link_shapes.py``, chapter 5 and
``tests/test_lab.py`` compare step times across link shapes on a machine shared with other
work.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

from course_lib.lab import Lab
from course_lib.metrics import read as read_metrics


def run_shape_blocks(lab: Lab, cmd, metrics: Path | str, shapes: list[str], block: int,
                     cycles: int = 1, timeout: float = 600,
                     env: dict | None = None) -> dict[str, list[dict]]:
    """Run a fine-tune ``cmd`` (with ``--steps-per-report 1``, ``--iters`` at least
    ``1 + block * len(shapes) * cycles``) while changing ``lab``'s link shape every
    ``block`` steps: step 1 on ``shapes[0]``, then blocks cycling through ``shapes``.

    A machine shared with other work gets slower and faster over a run; changing the
    shape *during* one run, in alternating blocks, lets such drifts hit every shape
    alike, so that the shapes' medians can be compared. ``env`` defaults to
    :meth:`Lab.env`. Returns ``{shape: [train records]}`` from ``metrics`` (the run's
    ``metrics.jsonl``, read as it grows), without each block's first step (it may have
    started before the change). Raises ``RuntimeError`` with the run's output when it
    fails, ``TimeoutError`` after ``timeout`` seconds (the run is killed).
    """
    metrics = Path(metrics)
    metrics.unlink(missing_ok=True)
    plan = {2 + b * block: shapes[b % len(shapes)] for b in range(len(shapes) * cycles)}
    pending = sorted(plan)
    lab.set_shape(shapes[0], log=lambda m: None)

    def reported() -> dict[int, dict]:
        return {r["iteration"]: r for r in read_metrics(metrics, missing_ok=True)
                if r["split"] == "train"}

    started = time.monotonic()
    output: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env if env is not None else lab.env()) as proc:
        os.set_blocking(proc.stdout.fileno(), False)
        while proc.poll() is None:
            output.extend(proc.stdout.readlines())
            if time.monotonic() - started > timeout:
                proc.kill()
                raise TimeoutError(f"{shlex.join(cmd)} still running after {timeout} s")
            if pending:
                done = max(reported(), default=0)
                # The block starting at step i: change the link once step i-1 is reported.
                while pending and done >= pending[0] - 1:
                    lab.set_shape(plan[pending.pop(0)], log=lambda m: None)
            time.sleep(0.01)
        output.extend(proc.stdout.readlines())
    if proc.returncode != 0 or pending:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}"
                           f"{' before the last block' if pending else ''}:\n"
                           + "".join(output[-30:]))
    records = reported()
    by_shape: dict[str, list[dict]] = {s: [] for s in shapes}
    for first, shape in plan.items():
        by_shape[shape] += [records[i] for i in range(first + 1, first + block)
                            if i in records]
    return by_shape
