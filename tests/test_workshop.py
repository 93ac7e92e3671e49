"""python -m course_lib.workshop: hostfiles from a list of laptops, key login, rsync and
set-up on every host, doctor on every host in one table, the fine-tune across them.

The command line's input checks run anywhere. The rest runs in the two-host lab (root,
Linux; skipped elsewhere, saying why), where host b gets a folder of its own at this
checkout's path (``Lab.own_folder``), so that ``sync`` copies for real; and there every
failure docs/WORKSHOP.md lists is produced on purpose, with the message the guide quotes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, REPO, read_train_losses, run

import course_lib
from course_lib import checkpoint, doctor, lab as labmod
from course_lib.hostfile import Host, read_hostfile
from course_lib.lab import Lab
from course_lib.mpi import MPIError, find_open_mpi
from course_lib.workshop import WorkshopError, choose_network, local_networks, who_failed

REASON = labmod.unavailable_reason() or (
    None if shutil.which("rsync") else "rsync not found: bash scripts/setup.sh installs it")
needs_lab = pytest.mark.skipif(REASON is not None, reason=str(REASON))
WS = [PY, "-m", "course_lib.workshop"]
A, B = labmod.ADDRESSES["a"], labmod.ADDRESSES["b"]
FT = ["--model", "tiny", "--iters", "6", "--steps-per-report", "1", "--steps-per-eval", "1000",
      "--save-every", "2", "--val-batches", "1", "--no-progress"]


# ----------------------------------------------------------------------------- anywhere

def test_hosts_writes_both_forms_that_read_back(tmp_path):
    hostfile = tmp_path / "hostfile"
    proc = run([*WS, "--hostfile", hostfile, "hosts", "127.0.0.1:2"])
    assert [(h.name, h.slots) for h in read_hostfile(hostfile)] == [("127.0.0.1", 2)]
    assert json.loads((tmp_path / "hostfile.json").read_text()) == [
        {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2  # mlx.launch: one entry per rank
    assert "rank 0 on 127.0.0.1 (this machine)" in proc.stdout


@pytest.mark.parametrize("entries,text,message", [
    (["127.0.0.1", "127.0.0.2:0"], None,
     "<command line> argument:2: slots='0' must be a whole number >= 1"),
    (["127.0.0.1", "laptop-7!"], None,
     "<command line> argument:2: 'laptop-7!' is not a host name or address"),
    (None, "# the classroom\n127.0.0.1:2\n\n127.0.0.1  # again\n",
     "FILE:4: host 127.0.0.1 is listed twice (first on line 2)"),
    (["192.0.2.10"], None, "none of the hosts is this machine"),  # TEST-NET-1: nobody's
    (["127.0.0.1", "192.0.2.10"], None, "127.0.0.1 is a loopback address, which other hosts"),
])
def test_hosts_refuses_bad_lists_naming_the_entry(tmp_path, entries, text, message):
    hostfile, listing = tmp_path / "hostfile", tmp_path / "laptops.txt"
    if text is not None:
        listing.write_text(text)
    args = ["--file", listing] if entries is None else entries
    proc = run([*WS, "--hostfile", hostfile, "hosts", *args], check=False)
    assert proc.returncode == 2 and not hostfile.exists()
    [line] = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("workshop hosts: error: ")
    assert message.replace("FILE", str(listing)) in line


def test_steps_before_hosts_say_to_run_it(tmp_path):
    proc = run([*WS, "--hostfile", tmp_path / "hostfile", "keys"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"workshop keys: error: {tmp_path / 'hostfile'}: no such "
                                   "hostfile: run `python -m course_lib.workshop hosts "
                                   "ADDR[:SLOTS] ...` first")


def test_local_networks_and_the_network_of_rank_0(monkeypatch):
    found = local_networks()
    if shutil.which("ip") or shutil.which("ifconfig"):
        assert any(str(iface) == "127.0.0.1/8" for _, iface in found), found
    import ipaddress

    import course_lib.workshop as ws
    monkeypatch.setattr(ws, "local_networks", lambda: [
        ("lo", ipaddress.ip_interface("127.0.0.1/8")),
        ("en0", ipaddress.ip_interface("192.168.2.1/24"))])
    hosts = [Host(a, ips=[a]) for a in ("192.168.2.1", "192.168.2.7", "192.168.2.200")]
    assert choose_network(hosts) == "192.168.2.0/24"
    with pytest.raises(WorkshopError, match=r"192\.168\.3\.4 not on 192\.168\.2\.0/24 \(en0"):
        choose_network([*hosts, Host("192.168.3.4", ips=["192.168.3.4"])])
    assert choose_network(hosts[:1]) is None


def _open_mpi():
    try:
        return find_open_mpi()
    except MPIError as e:
        pytest.skip(f"no Open MPI: {e}")


def test_doctor_names_an_interface_that_is_not_there():
    """The wrong-interface messages `check` quotes, from a real mpirun (no lab needed):
    Open MPI 5 exits 213 and does not say which interface it was given."""
    if _open_mpi().major != 5:
        pytest.skip("the exit status and message are Open MPI 5's")
    proc = run([PY, "-m", "course_lib.doctor", "--ranks", "2", "--interface", "nosuch0"],
               check=False, timeout=120)
    assert proc.returncode == 1
    assert ("FAIL  all-reduce: mpirun -np 2 exited 213: no network interface matches nosuch0 "
            "on the host that starts the ranks") in proc.stdout
    if not any(name != "lo" for name, _ in local_networks()):
        return  # a machine with loopback only: Open MPI uses lo there
    proc = run([PY, "-m", "course_lib.doctor", "--ranks", "2", "--interface", "lo"],
               check=False, timeout=120)
    assert proc.returncode == 1
    assert ("FAIL  all-reduce: mpirun -np 2 exited 213: Open MPI found no network interface "
            "for lo on the host that starts the ranks: it does not use a loopback interface "
            "while the host has another network") in proc.stdout


@pytest.mark.parametrize("output,found", [
    # Open MPI 5.0.11: a rank that exits non-zero, and one killed (its node is that host's
    # own host name, not the hostfile's entry), each banner as a NUL-ended capture.
    ("-----\nprterun detected that one or more processes exited with non-zero status,\n"
     "thus causing the job to be terminated. The first process to do so was:\n\n"
     "   Process name: [prterun-lab-a-14417@1,1]\n   Exit code:    3\n-----\n\0",
     ("10.0.0.2", "rank 1 on 10.0.0.2 exited with code 3")),
    ("-----\nprterun noticed that process rank 2 with PID 14393 on node lab-c exited on\n"
     "signal 9 (Killed).\n-----\n\0", ("10.0.0.3", "rank 2 on 10.0.0.3 was killed (signal "
                                          "9, Killed)")),
    # Open MPI 4.1.
    ("Process name: [[4113,1],0]\n  Exit code:    1\n",
     ("10.0.0.1", "rank 0 on 10.0.0.1 exited with code 1")),
    ("mpirun noticed that process rank 1 with PID 0 on node 10.0.0.2 exited on signal 9 "
     "(Killed).", ("10.0.0.2", "rank 1 on 10.0.0.2 was killed (signal 9, Killed)")),
    # The fine-tune's --step-timeout; a rank the hostfile does not have; nothing known.
    ("rank 2: no step finished for 60 s (--step-timeout)",
     (None, "rank 2 (10.0.0.3) waited 60 s for a step: another host stopped answering")),
    ("Process name: [prterun-x-1@1,7]\n Exit code: 1", None),
    ("Traceback ...\nValueError: no", None),
])
def test_who_failed_maps_the_rank_to_its_hostfile_entry(output, found):
    hosts = [Host("10.0.0.1", 1), Host("10.0.0.2", 1), Host("10.0.0.3", 2)]
    assert who_failed(output, hosts) == found


def test_doctor_json_reports_versions_and_every_check():
    proc = run([PY, "-m", "course_lib.doctor", "--ranks", "1", "--json"], check=False,
               timeout=120)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["python"] == PY
    assert found["versions"]["course_lib"] == course_lib.__version__
    assert found["versions"]["course_lib_files"] == doctor.source_digest()
    checks = [r["check"] for r in found["results"]]
    assert checks[:6] == ["platform", "defaults", "MLX", "BLAS", "OpenMPI", "libmpi"]
    assert checks[-1] == "all-reduce"
    assert proc.returncode == (1 if any(r["status"] == "FAIL" for r in found["results"]) else 0)
    assert "PASS  MLX" in proc.stderr  # the lines go to stderr


# ----------------------------------------------------------------------------- the lab

class Classroom:
    """The lab with host b's own copy of the checkout; runs the workshop's steps on host a
    (rank 0, the instructor's machine), with its own hostfile."""

    def __init__(self, lab: Lab, folder: Path):
        self.lab, self.folder = lab, folder
        self.hostfile = folder / "hostfile"

    def ws(self, *args, check=True, hostfile=None, timeout=600):
        cmd = self.lab.host_command("a", *WS, "--hostfile", hostfile or self.hostfile, *args,
                                    cwd=REPO)
        return run(cmd, env=self.lab.env(), check=check, timeout=timeout)

    def on_b(self, *cmd, **kw):
        return self.lab.run("b", *cmd, **kw)


@pytest.fixture(scope="module")
def classroom():
    lab = Lab(f"clws{os.getpid()}")
    lab.up(log=lambda m: None)
    folder = REPO / "runs" / f"test_workshop_{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        backing = lab.own_folder("b", REPO)
        # Host b sees an empty folder at the checkout's path; this machine the checkout.
        assert not os.path.ismount(REPO)
        assert lab.run("b", "ls", "-A", REPO, cwd="/").stdout == ""
        lab.run("b", "mountpoint", "-q", REPO, cwd="/")
        room = Classroom(lab, folder)
        room.backing = backing
        yield room
    finally:
        lab.down(log=lambda m: None)
        shutil.rmtree(folder, ignore_errors=True)
    assert lab.leftovers() == []


def _records(folder: Path) -> list[dict]:
    from course_lib import metrics

    return metrics.read(folder, missing_ok=True)


def _row(output: str, host: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(host + " "))


@needs_lab
@pytest.mark.distributed
@pytest.mark.slow
def test_from_a_list_of_hosts_to_a_two_host_run(classroom, tiny_model):
    room, lab = classroom, classroom.lab
    proc = room.ws("hosts", B, A)  # rank 0 is this machine, wherever it is listed
    assert f"{A} is this machine: it goes first, as rank 0" in proc.stderr
    assert [h.name for h in read_hostfile(room.hostfile)] == [A, B]
    assert [e["ssh"] for e in json.loads((room.folder / "hostfile.json").read_text())] == [A, B]
    assert "network: 10.77.0.0/24" in proc.stdout

    assert f"ok    {B}: passwordless login works" in room.ws("keys").stdout

    # Host b has no internet (the lab's hosts have no route out): setup.sh's pip fails there.
    proc = room.ws("sync", "--model", "none", check=False)
    assert proc.returncode == 1
    assert f"FAIL  {B}: set-up failed: [setup] error: pip install failed" in proc.stdout
    assert "fix: that host cannot reach the package registry" in proc.stdout
    assert (room.backing / "scripts" / "setup.sh").exists()  # the copy itself went through

    (room.backing / "stale-file").write_text("not in the checkout")
    proc = room.ws("sync", "--copy-venv", "--model", "tiny")
    assert re.search(rf"^ok    {re.escape(B)}: ready \(\d+ files changed; ", proc.stdout, re.M)
    assert "sync: 2 of 2 hosts ready" in proc.stdout
    assert not (room.backing / "stale-file").exists()  # rsync --delete: a mirror
    assert (room.backing / ".venv" / "bin" / "python").exists()
    # b imports course_lib from its own copy, at the same path as here.
    where = room.on_b(PY, "-c", "import course_lib; print(course_lib.__file__)", cwd="/")
    assert where.stdout.strip() == str(REPO / "course_lib" / "__init__.py")

    proc = room.ws("check")
    assert re.match(rf"{re.escape(B)}\s+PASS\s+PASS \S+\s+PASS \w+\s+PASS \S+\s+match\s+"
                    r"(PASS|WARN) \d+\.\d+ GB/s", _row(proc.stdout, B)), proc.stdout
    assert "check: all hosts ready" in proc.stdout

    # The fine-tune across both hosts: every step's all-reduce crosses the lab's link.
    out = room.folder / "two"
    before = lab.counters("a")
    proc = room.ws("run", "--", *FT, "--adapter-path", out)
    cmd = proc.stdout.splitlines()[0]
    # The mpirun line: the course's Open MPI by its absolute path, --prefix (where prted is
    # on b), both interface options for the hosts' subnet (out-of-band: PRRTE's, in 5.x),
    # the libmpi MLX opens, all ranks free of core binding, the program by absolute path.
    mpi = _open_mpi()
    assert mpi.mpirun.is_absolute() and mpi.libmpi is not None
    assert cmd == "run: " + shlex.join([
        str(mpi.mpirun), "-np", "2", "--hostfile", str(room.hostfile.resolve()),
        "--allow-run-as-root", "--prefix", str(mpi.prefix),
        "--mca", "btl_tcp_if_include", "10.77.0.0/24",
        "--prtemca" if mpi.major >= 5 else "--mca", "oob_tcp_if_include", "10.77.0.0/24",
        "-x", f"MLX_MPI_LIBNAME={mpi.libmpi}", "--bind-to", "none",
        PY, "-m", "course_lib.fine_tune", *FT, "--adapter-path", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["backend"]) == (2, "mpi")
    volume = summary["iterations"] * summary["trainable_parameters"] * 4
    assert lab.counters("a")["tx_bytes"] - before["tx_bytes"] >= volume

    # Ctrl-C to the workshop's run: it reaches run only (mpirun has a session of its own),
    # which relays it through mpirun; every rank stops after the same step, rank 0 saves it.
    stopped = room.folder / "stopped"
    cmd = lab.host_command("a", *WS, "--hostfile", room.hostfile, "run", "--", *FT,
                           "--iters", "400", "--adapter-path", stopped, cwd=REPO)
    proc = subprocess.Popen([str(c) for c in cmd], env=lab.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not [r for r in _records(stopped) if r["split"] == "train" and r["iteration"] >= 3]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    line = next(ln for ln in stdout.splitlines() if ln.startswith("Stopped by SIGINT on "))
    step = int(line.split("after step ")[1].split()[0])
    assert step < 400 and checkpoint.latest(stopped) == step
    assert "run: stopped; continue from the checkpoint: python -m course_lib.workshop run -- " \
        "--resume --model tiny" in stderr

    # A laptop leaves mid-run (its rank is killed at step 4): run names it and says how to
    # go on; the others continue from the checkpoint of step 2 and finish the same curve.
    left = room.folder / "left"
    tic = time.monotonic()
    proc = room.ws("run", "--env", "COURSE_LIB_FAULT=kill-rank-1@4", "--", *FT,
                   "--adapter-path", left, check=False)
    assert proc.returncode == 137 and time.monotonic() - tic < 120
    # Open MPI names the node lab-b (b's own host name); run names the hostfile's entry.
    assert "on node lab-b exited on" in proc.stdout
    assert f"run: mpirun exited 137: rank 1 on {B} was killed (signal 9, Killed)." \
        in proc.stderr
    assert f"if {B} left, list the others: python -m course_lib.workshop hosts {A}:1" \
        in proc.stderr
    assert "then continue from the last checkpoint: python -m course_lib.workshop run -- " \
        "--resume --model tiny" in proc.stderr
    room.ws("hosts", f"{A}:1")
    proc = room.ws("run", "--", "--resume", *FT, "--adapter-path", left)
    resumed = json.loads((left / "summary.json").read_text())
    assert (resumed["world_size"], resumed["resumed_from"]) == (1, 2)
    done, ref = read_train_losses(left), read_train_losses(out)
    assert sorted(done) == sorted(ref) == list(range(1, 7))
    assert max(abs(done[i] - ref[i]) / ref[i] for i in ref) < 1e-4


@needs_lab
@pytest.mark.distributed
@pytest.mark.slow
def test_each_failure_in_the_guide(classroom, tiny_model):
    room, lab = classroom, classroom.lab
    room.ws("hosts", A, B)
    room.ws("sync", "--copy-venv", "--model", "none")
    assert room.ws("check").returncode == 0

    # 1. No SSH key on a laptop: keys prints the lines that fix it, check says to run keys.
    keys = lab.dir / "b" / "authorized_keys"
    saved = keys.read_text()
    keys.write_text("")
    try:
        proc = room.ws("keys", check=False)
        assert proc.returncode == 1
        assert f"FAIL  {B}: root@{B}: Permission denied (publickey)." in proc.stdout
        assert f"  ssh-copy-id {B}    # asks for {B}'s password once" in proc.stdout
        proc = room.ws("check", check=False)
        assert proc.returncode == 1
        assert f"  {B}: SSH: root@{B}: Permission denied (publickey).\n" \
               "    fix: python -m course_lib.workshop keys" in proc.stdout
    finally:
        keys.write_text(saved)

    # 2. A laptop that does not answer (off, asleep, on another network).
    away = room.folder / "away"
    room.ws("hosts", A, "10.77.0.3", hostfile=away)
    proc = room.ws("keys", hostfile=away, check=False)
    assert proc.returncode == 1
    assert "FAIL  10.77.0.3: ssh: connect to host 10.77.0.3 port 22: No route to host" \
        in proc.stdout
    assert "# 10.77.0.3 does not answer: is it on, awake and on this network?" in proc.stdout

    # 3. Versions differ: b's copy is another version of the course.
    init = REPO / "course_lib" / "__init__.py"
    room.on_b("mountpoint", "-q", REPO, cwd="/")  # b's own copy, never this checkout
    room.on_b("sed", "-i", 's/^__version__ = .*/__version__ = "0.0.9"/', init, cwd="/")
    assert course_lib.__version__ in init.read_text()
    proc = room.ws("check", check=False)
    assert proc.returncode == 1
    assert re.match(rf"{re.escape(B)}\s+PASS\s+PASS.*DIFFER\s+skipped", _row(proc.stdout, B))
    assert f"  {B}: versions: course_lib 0.0.9 there, {course_lib.__version__} on rank 0, " \
           "course_lib_files " in proc.stdout
    assert "fix: python -m course_lib.workshop sync (the same commit" in proc.stdout
    room.ws("sync", "--model", "none")
    assert room.ws("check").returncode == 0

    # 4. A wrong interface: one that does not reach the other host, one that is not there.
    proc = room.ws("check", "--interface", "lo", check=False)
    assert proc.returncode == 1 and re.match(rf"{re.escape(B)}\s.*match\s+FAIL$",
                                             _row(proc.stdout, B))
    assert (f"  {B}: all-reduce with rank 0: mpirun -np 2 exited 213: Open MPI found no "
            "network interface for lo on the host that starts the ranks: it does not use a "
            "loopback interface while the host has another network\n"
            "    fix: leave out --interface") in proc.stdout
    proc = room.ws("check", "--interface", "nosuch0", check=False)
    assert proc.returncode == 1 and re.match(rf"{re.escape(B)}\s.*match\s+FAIL$",
                                             _row(proc.stdout, B))
    assert (f"  {B}: all-reduce with rank 0: mpirun -np 2 exited 213: no network interface "
            "matches nosuch0 on the host that starts the ranks") in proc.stdout
    proc = room.ws("run", "--interface", "nosuch0", "--", *FT, "--adapter-path",
                   room.folder / "nowhere", check=False, timeout=120)
    assert proc.returncode == 213
    assert ("No network interfaces were found for out-of-band communications. We require\n"
            "at least one available network for out-of-band messaging.") in proc.stdout
    # Ranks that never started: run says why, not that a laptop left.
    assert ("run: mpirun exited 213 before the fine-tune started: no network interface "
            "matches nosuch0 on the host that starts the ranks") in proc.stderr
    assert "left" not in proc.stderr and "--resume" not in proc.stderr

    # 5. A slow link (Wi-Fi): check passes with a warning on that host's bandwidth.
    lab.set_shape("wifi", log=lambda m: None)
    try:
        proc = room.ws("check")
        assert re.match(rf"{re.escape(B)}\s.*match\s+WARN 0\.0\d GB/s", _row(proc.stdout, B))
        assert f"  {B}: link speed: latency" in proc.stdout and "below 0.1 GB/s" in proc.stdout
    finally:
        lab.set_shape("none", log=lambda m: None)

    # 6. Nothing at the path on a laptop (not synced): check says to sync.
    lab.own_folder("b", REPO)  # an empty folder over b's copy
    proc = room.ws("check", check=False)
    assert proc.returncode == 1 and re.match(rf"{re.escape(B)}\s+PASS\s+FAIL",
                                             _row(proc.stdout, B))
    assert f"  {B}: {PY} cannot run course_lib.doctor there" in proc.stdout
    assert "    fix: python -m course_lib.workshop sync" in proc.stdout

    # 7. A laptop whose SSH server is off: the address answers, nothing listens on port 22.
    pid = lab.sshd_pid("b")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while lab.sshd_pid("b") and time.monotonic() < deadline:
        time.sleep(0.1)
    proc = room.ws("keys", check=False)
    assert proc.returncode == 1
    assert f"FAIL  {B}: ssh: connect to host {B} port 22: Connection refused" in proc.stdout
    assert f"# on {B}: turn on its SSH server (macOS: System Settings > General > Sharing > " \
           "Remote Login" in proc.stdout
