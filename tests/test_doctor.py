"""python -m course_lib.doctor: passes here, fails with its hint where it should."""

import pytest
from conftest import PY, run

from course_lib.launch import child_env


@pytest.mark.distributed
def test_doctor_passes_with_two_local_ranks():
    proc = run([PY, "-m", "course_lib.doctor", "--ranks", "2"], timeout=180)
    assert "all checks passed" in proc.stdout
    for check in ("MLX", "BLAS", "OpenMPI", "all-reduce", "link speed"):
        assert f"PASS  {check}" in proc.stdout or f"WARN  {check}" in proc.stdout, check
    assert "all_sum of 1..2 = 3 on all 2 ranks" in proc.stdout


def test_doctor_fails_on_an_unreachable_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    # A loopback address with no SSH server behind it: unreachable, and no traffic leaves.
    hostfile.write_text("localhost slots=1\n127.0.0.9 slots=1\n")
    proc = run([PY, "-m", "course_lib.doctor", "--hostfile", hostfile], check=False, timeout=120)
    assert proc.returncode == 1
    assert "FAIL  SSH 127.0.0.9: passwordless login failed" in proc.stdout
    assert "hint: ssh-keygen -t ed25519 (once), then ssh-copy-id 127.0.0.9" in proc.stdout


def test_doctor_fails_on_a_bad_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node slots=0\n")
    proc = run([PY, "-m", "course_lib.doctor", "--hostfile", hostfile], check=False)
    assert proc.returncode == 1 and f"FAIL  hostfile: {hostfile}:1: slots='0'" in proc.stdout


def test_doctor_fails_when_openmpi_is_hidden(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run([PY, "-m", "course_lib.doctor"], check=False, env=child_env(PATH=str(empty)))
    assert proc.returncode == 1
    assert "FAIL  OpenMPI: mpirun not found on PATH" in proc.stdout
    assert "hint: install OpenMPI" in proc.stdout
