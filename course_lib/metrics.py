"""``metrics.jsonl``: what a fine-tune reports, one JSON object a line, written and read here.

Rank 0 of a fine-tune starts ``ADAPTER_PATH/metrics.jsonl`` (:data:`FILE`) when the run
starts (:func:`start`) and appends one record per report (:func:`append`). Each record has
``iteration``, ``split`` (``"train"``, ``"valid"`` or ``"rank"``), ``loss`` (mean
cross-entropy per target token, nats; ``null`` for a window that scored no token) and
``world_size``; train records also have ``tokens``, ``seconds``, ``tokens_per_second``,
``learning_rate`` and ``peak_memory_gb`` (GB, largest over ranks); ``rank`` records (one
per rank and report) a rank's own numbers: ``rank``, ``host``, ``tokens``,
``step_seconds``... (:meth:`course_lib.fine_tune.reporting.Reporter.gather`).

One reader, :func:`read`, for a finished run, a live one and one a kill cut short, with one
rule. A record is appended as its line and newline in one write, and a failed write is cut
back, so every line that ends in a newline is whole; only the text after the last newline
can be a record still being written (a live run) or cut short (a run killed mid-write).
That text is kept when it parses as a JSON object (an object cannot parse before its
closing brace is written) and left out otherwise. A line that ends in a newline and is not
a JSON object means a damaged file, or not a metrics file: ``ValueError`` naming the file
and line.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from course_lib import atomic

FILE = "metrics.jsonl"


def read(path: str | Path, missing_ok: bool = False) -> list[dict]:
    """The records of a ``metrics.jsonl``: ``path`` is the file, or the adapter folder that
    holds one. A record still being written or cut short at the end of the file is left
    out (the rule above); blank lines are skipped.

    Raises ``FileNotFoundError`` when the file does not exist, unless ``missing_ok`` (a run
    that has not started writing yet: ``[]``), and ``ValueError`` naming ``file:line`` for a
    whole line that is not a JSON object.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    *whole, tail = data.split(b"\n")
    records = [_record(line, path, n) for n, line in enumerate(whole, 1) if line.strip()]
    if tail.strip():
        with contextlib.suppress(ValueError):  # still being written, or cut short by a kill
            records.append(_record(tail, path, len(whole) + 1))
    return records


def _record(line: bytes, path: Path, lineno: int) -> dict:
    """``line`` as a record; ``ValueError`` naming ``path:lineno`` when it is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})"
                         ) from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
                         ) from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                         f"{type(record).__name__}")
    return record


def start(path: str | Path, resume_from: int | None = None) -> list[dict]:
    """Start ``path`` for a run, atomically (:func:`course_lib.atomic.write_jsonl`), and
    return the records it keeps.

    A new run (``resume_from`` None) starts it empty. A run resuming from iteration
    ``resume_from`` keeps the records up to that iteration (the steps after it run again; a
    last line a kill cut short goes too, :func:`read`); when the file is missing, it keeps
    none and writes nothing (the first :func:`append` creates it). Raises
    :class:`course_lib.atomic.WriteError` when the file cannot be written, and
    :func:`read`'s ``ValueError`` for a damaged file.
    """
    path = Path(path)
    exists = path.exists()
    kept = ([r for r in read(path) if r["iteration"] <= resume_from]
            if resume_from is not None and exists else [])
    if resume_from is None or exists:
        atomic.write_jsonl(path, kept)
    return kept


def append(path: str | Path, record: dict) -> None:
    """Append ``record`` to ``path`` as one line, in one write; NaN numbers are written as
    ``null`` (a window that scored no token has no mean loss), so that the file is strict
    JSON for any reader.

    When the write fails (disk full, read-only...), the file is cut back to its previous
    length, so no half line stays, and :class:`course_lib.atomic.WriteError` names
    ``path`` and the reason.
    """
    path = Path(path)
    line = json.dumps(_nan_to_none(record)) + "\n"
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise atomic.WriteError(path, e) from e


def _nan_to_none(record: dict) -> dict:
    """``record`` with NaN numbers as None, in nested dictionaries too."""
    return {k: _nan_to_none(v) if isinstance(v, dict) else
            (None if isinstance(v, float) and v != v else v) for k, v in record.items()}
