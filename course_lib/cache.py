"""Where the course's built models live, and building one so that it is whole or absent.

Both models the course builds on first use (SmolLM2 converted from its GGUF,
:mod:`course_lib.models`; the tiny test model, :mod:`course_lib.tiny_model`) go into
:func:`cache_dir`, each into a folder named after what decides its contents. Several ranks
on one host may ask for a model at once: :func:`file_lock` lets one build while the others
wait, and :func:`building` makes the folder appear only when it is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where built models live: ``$COURSE_LIB_CACHE``, else ``$XDG_CACHE_HOME/course_lib``,
    else ``~/.cache/course_lib``."""
    if os.environ.get("COURSE_LIB_CACHE"):
        return Path(os.environ["COURSE_LIB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "course_lib"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path``: ranks on one host wait while one of them builds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def building(out: Path):
    """A temporary folder beside ``out`` that becomes ``out`` when the block succeeds, so
    ``out`` is complete or absent; removed on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is for every user
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
