"""Everything a fine-tune writes into ``--adapter-path`` (rank 0 only): the adapter and its
config, checkpoints, ``metrics.jsonl`` (:mod:`course_lib.metrics`), ``summary.json`` and
``loss.png``; and the lock that keeps a second run out of a folder a live run is using.

Every file is written whole or not at all (:mod:`course_lib.atomic`). A write that fails
during training (disk full, read-only, permission denied) does not raise at once: it is
kept in :attr:`Outputs.error`, later writes are skipped, and the loop stops every rank at
the end of the step (:mod:`course_lib.fine_tune.interrupts`), so that no rank is left
waiting in an all-reduce for a rank 0 that left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from mlx.utils import tree_flatten

from course_lib import atomic, checkpoint, metrics
from course_lib.atomic import WriteError
from course_lib.fine_tune.errors import UsageError
from course_lib.metrics import FILE as METRICS_FILE
from course_lib.plotting import plot_loss_curves

SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
LOCK_FILE = ".fine_tune.lock"


class FolderInUse(UsageError):
    """Another live fine-tune holds the folder's lock."""


class FolderLock:
    """One run per folder: an exclusive ``flock(2)`` on ``FOLDER/.fine_tune.lock``.

    :meth:`acquire` raises :class:`FolderInUse` (naming the holder's PID, host and start
    time, which the holder writes into the file) while another process holds it. The
    kernel drops a ``flock`` when its process ends, however it ends (SIGKILL, a crash, a
    closed laptop's reboot), so a dead run never leaves the folder locked and nothing needs
    deleting. The file itself stays. Works on local file systems; on NFS, Linux emulates
    ``flock`` with ``fcntl`` byte-range locks (since 2.6.12), which the server then keeps.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`FolderInUse`; :class:`WriteError` when the lock
        file cannot be created (read-only folder, permission denied...)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # name the folder: the user's path, not our hidden file
            raise WriteError(self.path.parent, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise FolderInUse(f"--adapter-path {self.path.parent} is in use by another "
                              f"fine-tune ({_describe_holder(holder)}); wait for it to end "
                              "or stop it, or choose another --adapter-path") from None
        with contextlib.suppress(OSError):  # who holds it: for the message above only
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"process {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that holds its lock file"


class Outputs:
    """Everything the run writes. On ranks other than 0 every method does nothing.

    ``error`` is the first :class:`course_lib.atomic.WriteError` of a write during training
    (:meth:`metric`, :meth:`checkpoint`); once set, those writes are skipped, and
    :meth:`adapters` and :meth:`finish` raise it.
    """

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled = Path(folder), enabled
        self.error: WriteError | None = None
        self._metrics: Path | None = None
        self._lock = FolderLock(self.folder)

    def start(self, config: dict, resume_from: int | None = None) -> list[dict]:
        """Create the folder, take its lock (:class:`FolderLock`), remove the temporary
        files a killed run left, write ``adapter_config.json`` and start ``metrics.jsonl``.

        When resuming from iteration ``resume_from``, keep the metric records up to it (the
        steps after it will run again; a last line cut short by a kill is dropped) and
        return them; otherwise start the file afresh (:func:`course_lib.metrics.start`).
        Raises :class:`FolderInUse` or :class:`WriteError` (the folder is a file,
        read-only, full...) before writing anything else, and :class:`UsageError` naming
        the line when resuming from a ``metrics.jsonl`` with a damaged line.
        """
        if not self.enabled:
            return []
        atomic.make_folder(self.folder)
        self._lock.acquire()
        atomic.remove_stale_temporaries(self.folder)
        atomic.write_json(self.folder / CONFIG_FILE, config)
        self._metrics = self.folder / METRICS_FILE
        try:
            return metrics.start(self._metrics, resume_from)
        except ValueError as e:  # a damaged line: named, and nothing else is written
            raise UsageError(f"cannot continue its records: {e}; mend or remove that line") \
                from e

    def metric(self, record: dict) -> None:
        """Append one record to ``metrics.jsonl`` (:func:`course_lib.metrics.append`: NaN
        written as ``null``). On failure the file is cut back to its previous length (no
        half line) and the error kept in :attr:`error`."""
        if not self._metrics or self.error:
            return
        try:
            metrics.append(self._metrics, record)
        except WriteError as e:
            self.error = e

    def adapters(self, model) -> None:
        """Save the trainable weights as ``adapters.safetensors``; raises :attr:`error`
        when an earlier write failed, or :class:`WriteError`."""
        if self.enabled:
            self._raise_error()
            weights = dict(tree_flatten(model.trainable_parameters()))
            atomic.save_safetensors(self.folder / ADAPTER_FILE, weights)

    def checkpoint(self, iteration: int, model, optimizer, state: dict) -> Path | None:
        """Write the checkpoint at ``iteration`` (see :mod:`course_lib.checkpoint`) and
        update ``adapters.safetensors``; returns the checkpoint's adapter file, or None
        when not written (other ranks; a write failed: see :attr:`error`)."""
        if not self.enabled or self.error:
            return None
        try:
            saved = checkpoint.save(self.folder, iteration, model, optimizer, state)
            self.adapters(model)
        except WriteError as e:
            self.error = e
            return None
        return saved

    def finish(self, summary: dict, history: list[dict]) -> None:
        """Write ``summary.json`` and ``loss.png`` and release the folder's lock; raises
        :attr:`error` when an earlier write failed, or :class:`WriteError`."""
        if not self.enabled:
            return
        self._raise_error()
        atomic.write_json(self.folder / SUMMARY_FILE, summary)
        n = summary["world_size"]
        label = f"{n} rank{'s' if n > 1 else ''}"
        plot_loss_curves({label: history}, self.folder / PLOT_FILE,
                         title=f"Fine-tune, {label}, global batch {summary['global_batch']}")
        self.close()

    def close(self) -> None:
        """Release the folder's lock (also when the run ends early)."""
        self._lock.release()

    def _raise_error(self):
        if self.error is not None:
            raise self.error
