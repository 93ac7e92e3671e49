"""Files written whole or not at all, and write failures as one clear line.

Every file the course writes goes to a temporary file beside its target (a hidden name,
``.NAME.XXXXXXXX.tmp``), is flushed and ``fsync``-ed, then renamed over the target with
``os.replace``, which POSIX makes atomic within a file system: a reader, or a run that
continues after a crash, sees the old file or the new one, never half of one. (The
pattern of ``git``, ``rsync`` and most editors; see rename(2).)

When a write fails (disk full, read-only file system, permission denied, a file where a
folder should be), the temporary file is removed and :class:`WriteError` names the target
and the operating system's reason, e.g. ``cannot write runs/a/adapters.safetensors: No
space left on device``. A process killed outright (SIGKILL) cannot clean up after itself;
:func:`remove_stale_temporaries` sweeps what such a process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path

# The names this module's temporary files get: ".NAME." + 8 random characters + ".tmp".
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")

_HINTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EROFS: "the file system is mounted read-only",
    errno.EACCES: "this user may not write there",
    errno.EPERM: "this user may not write there (or the folder is immutable)",
    errno.EEXIST: "it is a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
}


class WriteError(OSError):
    """A file or folder could not be written. ``path`` is what we tried to write and
    ``errno`` / ``strerror`` the operating system's reason; ``str()`` is one line:
    ``cannot write PATH: REASON (HINT)``."""

    def __init__(self, path: str | Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = Path(path)

    def __str__(self) -> str:
        hint = _HINTS.get(self.errno)
        return f"cannot write {self.path}: {self.strerror}" + (f" ({hint})" if hint else "")


def make_folder(folder: str | Path) -> Path:
    """``mkdir -p folder``; raises :class:`WriteError` naming ``folder`` when it cannot
    be made (also when it is an existing file)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError: it exists, and is not a folder
        raise WriteError(folder, e) from e
    return folder


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file for writing (``mode`` ``"w"`` or ``"wb"``); on a clean exit
    from the ``with`` block, flush, ``fsync`` and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was; an
    ``OSError`` becomes :class:`WriteError` (naming ``path``), others pass unchanged. The
    new file gets the mode a plain ``open()`` would give it (0666 less the umask).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        umask = os.umask(0)  # mkstemp makes the file 0600; read the umask to undo that
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from e
        raise


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) to ``path``, atomically; :class:`WriteError` on failure."""
    with atomic_write(path) as f:
        f.write(text)


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON to ``path``, atomically; :class:`WriteError` on failure."""
    text = json.dumps(obj, indent=1) + "\n"  # a TypeError here writes nothing at all
    write_text(path, text)


def write_jsonl(path: str | Path, records) -> None:
    """``records`` as JSON Lines (UTF-8, one object a line) to ``path``, atomically."""
    with atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def save_safetensors(path: str | Path, arrays: dict) -> None:
    """``mx.save_safetensors`` to ``path``, atomically. Written through a Python file, so
    a full disk raises ``OSError`` (ENOSPC) rather than MLX's ``RuntimeError("[write]
    Unable to write ...")``, and becomes :class:`WriteError`."""
    import mlx.core as mx

    with atomic_write(path, "wb") as f:
        mx.save_safetensors(f, arrays)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files (``.NAME.XXXXXXXX.tmp``) that a killed process left in
    ``folder``; returns them. Call it only while no other process writes there (e.g.
    holding :class:`course_lib.fine_tune.outputs.FolderLock`)."""
    removed = []
    for f in Path(folder).iterdir():
        if _TEMPORARY.match(f.name) and f.is_file():
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f)
    return removed
