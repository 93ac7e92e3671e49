"""Start ranks from Python (notebooks, tests, benchmarks) and follow a fine-tune live.

``mpirun_command``, ``mlx_launch_command`` and ``fine_tune_command`` build the command lines
the course teaches (``shell_line`` shows one as a person would type it); ``run_fine_tune``
runs ``python -m course_lib.fine_tune`` on 1 or N ranks in a subprocess and shows its
progress (an HTML bar in a notebook, tqdm elsewhere) by reading the ``metrics.jsonl`` the
run appends to.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from course_lib import metrics
from course_lib.mpi import mpirun_command  # noqa: F401  (the course's mpirun lines, re-exported)


def mlx_launch_command(n: int, *cmd, hostfile: str | None = None) -> list[str]:
    """``mlx.launch -n n -- cmd...`` (ring backend on this host), or ``--hostfile`` (JSON).

    The ``--`` keeps ``mlx.launch`` from taking options of the program (``--backend``,
    ``--env``, ``--cwd``...) as its own.
    """
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    where = ["--hostfile", str(hostfile)] if hostfile else ["-n", str(n)]
    return [launcher, *where, "--", *[str(c) for c in cmd]]


def child_env(**extra: str) -> dict:
    """The environment to start ranks with: ``os.environ`` as Python sees it, plus ``extra``.

    Pass it explicitly (``subprocess.run(cmd, env=child_env())``). Once a process calls
    ``mx.distributed.init()`` without a launcher (directly, or through ``mlx_lm``), MLX
    starts an MPI "singleton" that sets ~24 ``OMPI_*``/``PMIX_*`` variables at the C level;
    children inherit them by default, and an ``mpirun`` started that way exits 1 with no
    message. ``os.environ`` was copied at start-up and does not hold them.
    """
    return {**os.environ, **extra}


def python_module(module: str, *args) -> list[str]:
    """``[this python, "-m", module, args...]``."""
    return [sys.executable, "-m", module, *[str(a) for a in args]]


class _Progress:
    """A progress bar: in Jupyter an HTML ``<progress>`` bar and status line, updated in
    place (``display_id``), so the notebook keeps its final state as plain HTML and text
    that any viewer shows; a tqdm bar anywhere else."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        try:
            get_ipython()  # noqa: F821  (defined inside IPython only)
            from IPython.display import display

            self.handle = display(self._view(0, "starting"), display_id=True)
            self.tqdm = None
        except (NameError, ImportError):
            from tqdm import tqdm

            self.handle = None
            self.tqdm = tqdm(total=total, desc=label, unit="step", file=sys.stderr)

    def _view(self, iteration: int, status: str):
        from IPython.display import HTML

        text = f"{self.label}: step {iteration}/{self.total}, {status}"

        class View(HTML):  # HTML for the notebook, the same line as text for other viewers
            def __repr__(self):
                return text

        return View(f'<progress value="{iteration}" max="{self.total}" '
                    f'style="width: 16em"></progress>&nbsp;<code>{text}</code>')

    def update(self, iteration: int, status: str):
        if self.tqdm is not None:
            self.tqdm.update(iteration - self.tqdm.n)
            self.tqdm.set_postfix_str(status)
        else:
            self.handle.update(self._view(iteration, status))

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()


def fine_tune_command(adapter_path: str | Path, ranks: int = 1, launcher: str = "mpirun",
                      args: tuple | list = ()) -> list[str]:
    """The command :func:`run_fine_tune` runs: ``python -m course_lib.fine_tune
    --no-progress --adapter-path ADAPTER_PATH ARGS``, under ``mpirun -np N`` or
    ``mlx.launch -n N`` for ``ranks`` > 1. Raises ``ValueError`` for another launcher."""
    cmd = python_module("course_lib.fine_tune", "--no-progress", "--adapter-path",
                        adapter_path, *args)
    if ranks == 1:
        return cmd
    if launcher == "mpirun":
        return mpirun_command(ranks, *cmd)
    if launcher == "mlx.launch":
        return mlx_launch_command(ranks, *cmd)
    raise ValueError(f"launcher must be 'mpirun' or 'mlx.launch', got {launcher!r}")


def shell_line(cmd: list, root: str | Path | None = None) -> str:
    """``cmd`` as a person would type it: this Python as ``python``, the launchers as
    ``mpirun`` and ``mlx.launch``, paths under ``root`` (default: the working directory)
    relative, and ``shlex`` quoting. The words only this machine needs are left out:
    ``--allow-run-as-root`` (root alone needs it) and ``-x MLX_MPI_LIBNAME=...`` (a rank
    finds its libmpi by itself: :func:`course_lib.mpi.point_mlx_at_libmpi`). For showing
    commands in notebooks and logs the same on every machine."""
    import shlex

    root = str(Path(root or Path.cwd()).resolve()) + os.sep
    words, cmd = [], [str(c) for c in cmd]
    i = 0
    while i < len(cmd):
        word = cmd[i]
        i += 1
        if word == "--allow-run-as-root":
            continue
        if word == "-x" and i < len(cmd) and cmd[i].startswith("MLX_MPI_LIBNAME="):
            i += 1
            continue
        if word == sys.executable:
            word = "python"
        elif word == str(Path(sys.executable).parent / "mlx.launch"):
            word = "mlx.launch"
        elif i == 1 and Path(word).name == "mpirun":
            word = "mpirun"
        elif word.startswith(root):
            word = word[len(root):]
        words.append(shlex.quote(word))
    return " ".join(words)


def _iterations(args) -> int:
    """How many steps a fine-tune with options ``args`` runs (its recipe fills the rest)."""
    from course_lib.fine_tune import (  # lazy: loads MLX; launch only starts processes
        apply_recipe, build_parser)

    ns, _ = build_parser().parse_known_args([str(a) for a in args])
    apply_recipe(ns)
    return ns.iters


def run_fine_tune(adapter_path: str | Path, ranks: int = 1, launcher: str = "mpirun",
                  args: tuple | list = (), progress: bool = True, poll_seconds: float = 0.5,
                  timeout: float | None = None, env_extra: dict | None = None) -> dict:
    """Run the fine-tune CLI on ``ranks`` ranks and return its ``summary.json``.

    ``launcher`` is ``"mpirun"`` or ``"mlx.launch"`` (ignored for one rank: plain python).
    ``args`` are extra ``course_lib.fine_tune`` options; ``env_extra`` extra environment. While it runs, the progress bar
    follows ``metrics.jsonl`` (iteration, loss, tokens/s). Raises ``RuntimeError`` with the
    end of the run's output when it exits non-zero or, under ``mlx.launch`` (which exits 0
    regardless), when a rank exited non-zero; ``TimeoutError`` after ``timeout`` seconds
    (the run is killed).
    """
    adapter_path = Path(adapter_path)
    cmd = fine_tune_command(adapter_path, ranks, launcher, args)
    iters = _iterations(args)
    metrics_file = adapter_path / metrics.FILE
    metrics_file.unlink(missing_ok=True)  # so the bar does not show the previous run's records
    bar = _Progress(iters, f"{ranks} rank{'s' if ranks > 1 else ''}") if progress else None
    started = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=child_env(**(env_extra or {}))) as proc:
        output: list[str] = []
        os.set_blocking(proc.stdout.fileno(), False)
        while proc.poll() is None:
            output.extend(proc.stdout.readlines())
            if bar:
                train = [r for r in metrics.read(metrics_file, missing_ok=True)
                         if r["split"] == "train"]
                if train:
                    last = train[-1]
                    loss = "n/a" if last["loss"] is None else f"{last['loss']:.3f}"
                    bar.update(last["iteration"], f"train loss {loss}, "
                               f"{last['tokens_per_second']:.0f} tokens/s")
            if timeout is not None and time.monotonic() - started > timeout:
                proc.kill()
                raise TimeoutError(f"{' '.join(cmd)} still running after {timeout} s")
            time.sleep(poll_seconds)
        output.extend(proc.stdout.readlines())
    if bar:
        bar.update(iters, "done")
        bar.close()
    # mlx.launch (MLX 0.32) exits 0 even when a rank died; its warning names the rank.
    died = [m for m in re.finditer(r"Node with rank (\d+) exited with code (-?\d+)",
                                   "".join(output)) if m.group(2) != "0"]
    if proc.returncode != 0 or died:
        tail = "".join(output[-20:])
        who = "; ".join(f"rank {m.group(1)} exited with code {m.group(2)}" for m in died)
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}"
                           f"{' (' + who + ')' if who else ''}:\n{tail}")
    return json.loads((adapter_path / "summary.json").read_text())
