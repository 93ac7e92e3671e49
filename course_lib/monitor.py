"""``python -m course_lib.monitor RUN_DIR``: the live dashboard of a fine-tune, in TensorBoard.

A run started with ``--report-to tensorboard`` writes event files into
``RUN_DIR/tensorboard`` (:mod:`course_lib.fine_tune.reporting`): one run ``global`` with
the loss, tokens per second, learning rate and peak memory, and one run ``rankR-HOST`` per
rank with that rank's own loss, step time, forward+backward time, time at the all-reduce,
tokens and peak memory. Each chart draws every rank's series. Every rank's
``step_seconds`` is the same (the all-reduce makes them wait for each other every step);
the slow laptop is the one with the highest ``forward_backward_seconds`` and the lowest
``all_reduce_wait_seconds``: the others wait for it.

This serves them with TensorBoard on localhost and prints the URL. It works on a finished
run and on one still writing (TensorBoard rereads the folder every ``--reload-interval``
seconds; the run flushes its files after every report), and on a folder a run has not
created yet. Stop it with Ctrl-C. It is the same as::

    tensorboard --logdir RUN_DIR/tensorboard --host localhost --load_fast false

    python -m course_lib.monitor runs/two                 # http://localhost:6006/ or the next free port
    python -m course_lib.monitor runs/two --port 0        # a port the system picks
    python -m course_lib.monitor runs/two --host 0.0.0.0  # reachable from other machines
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from course_lib.metrics import FILE as METRICS_FILE
from course_lib.fine_tune.callbacks import TENSORBOARD_FOLDER, TENSORBOARD_MISSING


def event_folder(run_dir: str | Path) -> Path:
    """The folder TensorBoard reads for ``run_dir``: ``run_dir/tensorboard``, or
    ``run_dir`` itself when it is that folder (or holds event files directly)."""
    run_dir = Path(run_dir)
    if run_dir.name == TENSORBOARD_FOLDER or any(run_dir.glob("events.out.tfevents.*")):
        return run_dir
    return run_dir / TENSORBOARD_FOLDER


def note(run_dir: str | Path) -> str | None:
    """A line for the user when ``run_dir`` has no event files yet, else None."""
    run_dir = Path(run_dir)
    if any(event_folder(run_dir).rglob("events.out.tfevents.*")):
        return None
    if (run_dir / METRICS_FILE).exists():
        return (f"note: {run_dir} has {METRICS_FILE} but no TensorBoard event files: start "
                "the fine-tune with --report-to tensorboard to see it here")
    return (f"note: no event files in {event_folder(run_dir)} yet; the dashboard fills in "
            "when a fine-tune with --report-to tensorboard writes there")


def start(run_dir: str | Path, host: str = "localhost", port: int | None = None,
          reload_interval: float = 2.0) -> str:
    """Serve ``run_dir``'s event files with TensorBoard in a background thread of this
    process; returns the URL (``http://HOST:PORT/``). ``port`` None: 6006 or the next free
    port; 0: one the system picks. TensorBoard's own Python reader (``--load_fast
    false``), not its separate data-server process: the reader the tests use too.

    Raises :class:`ValueError` (naming ``--port``) when the port is taken, and
    :class:`ImportError` when TensorBoard is not installed."""
    try:
        from tensorboard import program
    except ImportError as e:
        raise ImportError(TENSORBOARD_MISSING.replace("tensorboardX", "tensorboard")) from e
    argv = [None, "--logdir", str(event_folder(run_dir)), "--host", host,
            "--load_fast", "false", "--reload_interval", str(reload_interval)]
    if port is not None:
        argv += ["--port", str(port)]
    board = program.TensorBoard()
    board.configure(argv=argv)
    try:
        return board.launch()
    except program.TensorBoardServerException as e:
        raise ValueError(f"--port {port}: {e.msg}") from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m course_lib.monitor",
                                description="TensorBoard on a fine-tune's folder "
                                "(its --adapter-path), live while it trains.")
    p.add_argument("run_dir", help="the run's --adapter-path (or its tensorboard folder)")
    p.add_argument("--host", default="localhost",
                   help="address to serve on (default localhost; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default 6006 or the next free one; 0: any free port)")
    p.add_argument("--reload-interval", type=float, default=2.0,
                   help="seconds between rereads of the event files (default 2)")
    args = p.parse_args(argv)
    if Path(args.run_dir).is_file():
        p.error(f"RUN_DIR {args.run_dir} is a file: give the run's folder (its --adapter-path)")
    if args.port is not None and not 0 <= args.port <= 65535:
        p.error(f"--port must be 0 to 65535, got {args.port}")
    if args.reload_interval <= 0:
        p.error(f"--reload-interval must be positive, got {args.reload_interval}")
    try:
        url = start(args.run_dir, args.host, args.port, args.reload_interval)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    message = note(args.run_dir)
    if message:
        print(message, flush=True)
    print(f"Dashboard of {args.run_dir} at {url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
