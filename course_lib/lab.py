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
- link **shapes** (``thunderbolt``, ``ethernet-1g``, ``wifi``, see
  :data:`course_lib.lab_shapes.SHAPES`): the bandwidth is enforced with a token-bucket
  filter (``tc qdisc ... tbf``) on both ends of the link. Latency is added with ``netem``
  only where the kernel has it; where it does not (``Specified qdisc kind is unknown``), the
  shape's latency is *not* emulated and the cost model
  (:func:`course_lib.traffic.ring_all_reduce_seconds`) adds it instead. :meth:`Lab.status`
  says which applies.

Everything the lab makes lives in ``/run/course_lab/NAME`` (keys, configs, hostfiles,
logs) and in the two namespaces; ``down`` removes all of it, also after a half-failed
``up``. Nothing listens outside the namespaces: the sshds, the ranks and ``prted`` all run
inside them, and the namespaces have no route but the lab link.

This module is the lab's life cycle and its command line: :class:`Lab` builds the lab
(``up``), shapes its link, says what exists (``status``, ``leftovers``) and removes it
(``down``). The rest has a module each: :mod:`course_lib.lab_system` (the fixed addresses,
the Linux tools and processes), :mod:`course_lib.lab_shapes` (the link shapes),
:mod:`course_lib.lab_commands` (the commands a ``Lab`` builds for its hosts:
``host_command``, ``mpirun_command``, ``mlx_launch_command``...) and
:mod:`course_lib.lab_experiments` (a fine-tune whose link changes shape as it runs).

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from course_lib.lab_commands import LabCommands
from course_lib.lab_shapes import SHAPES, check_shape, describe, qdisc_args
from course_lib.lab_system import (ADDRESSES, HOSTNAMES, HOSTS, INTERFACE, PREFIX_LENGTH, SSHD,
                                   LabError, alive, netem_available, netns_names, netns_pids,
                                   remove_netns_dir, run_tool, sshd_running, tcp_listeners,
                                   terminate, unavailable_reason)

DEFAULT_NAME = "course-lab"
STATE_ROOT = Path(os.environ.get("COURSE_LAB_STATE", "/run/course_lab"))


class Lab(LabCommands):
    """Two network hosts on this machine (see the module docstring).

    ``Lab(name)`` only names things; :meth:`up` builds, :meth:`down` removes. Use it as
    ``with Lab(name).running(shape="wifi") as lab: ...`` to be sure it comes down. The
    commands that run on its hosts come from :class:`course_lib.lab_commands.LabCommands`.
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
        return pid if alive(pid) else None

    def is_up(self) -> bool:
        """Both namespaces exist and both sshds run."""
        names = set(netns_names())
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
        if shape is not None:
            check_shape(shape)
        if self.is_up():
            log(f"lab {self.name} is already up")
            if shape is not None:
                self.set_shape(shape, log=log)
            return self
        if self.dir.exists() or any(self.ns(h) in netns_names() for h in HOSTS):
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
        """:meth:`up`'s steps, in order; what each makes, :meth:`down` removes."""
        self._make_state_dir()
        self._make_link()
        log(f"hosts: {self.ns('a')} ({HOSTNAMES['a']}, {ADDRESSES['a']}) and "
            f"{self.ns('b')} ({HOSTNAMES['b']}, {ADDRESSES['b']}) joined by {INTERFACE}")
        self._make_keys()
        self._write_client_files()
        for host in HOSTS:
            self._start_sshd(host)
        self._check_logins()
        log(f"sshd on {ADDRESSES['a']}:22 and {ADDRESSES['b']}:22 (lab link only); key login "
            f"works both ways")
        log(f"hostfile: {self.hostfile}\nhostfile.json: {self.hostfile_json}")

    def _make_state_dir(self) -> None:
        """The lab's folder, with a note of the shared folders ``up`` makes (so that
        :meth:`down` removes only those)."""
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

    def _make_link(self) -> None:
        """Two hosts and a cable between them: both ends are called lab0, like the bridge0
        of two Macs joined by Thunderbolt."""
        for host in HOSTS:
            run_tool(["ip", "netns", "add", self.ns(host)])
        run_tool(["ip", "link", "add", INTERFACE, "netns", self.ns("a"), "type", "veth",
                  "peer", "name", INTERFACE, "netns", self.ns("b")])
        for host in HOSTS:
            ns = self.ns(host)
            run_tool(["ip", "-n", ns, "link", "set", "lo", "up"])
            run_tool(["ip", "-n", ns, "addr", "add", f"{ADDRESSES[host]}/{PREFIX_LENGTH}",
                      "dev", INTERFACE])
            run_tool(["ip", "-n", ns, "link", "set", INTERFACE, "up"])

    def _make_keys(self) -> None:
        """The user's key pair, as the course teaches: ssh-keygen, then the public key
        appended to each host's authorized keys (what ssh-copy-id does); each host's
        folder (:meth:`_make_host_dir`); the known hosts, for the lab's ``ssh``."""
        key = self.dir / "id_ed25519"
        run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                  f"course-lab {self.name}", "-f", key])
        public = (self.dir / "id_ed25519.pub").read_text()
        known = [self._make_host_dir(host, public) for host in HOSTS]
        (self.dir / "known_hosts").write_text("".join(known))

    def _make_host_dir(self, host: str, public: str) -> str:
        """``host``'s folder: its temporary folder, host key, authorized keys (``public``),
        ``/etc/hosts`` and sshd config. Returns its line of ``known_hosts``."""
        hdir = self.dir / host
        hdir.mkdir(mode=0o700)
        # The host's own temporary folder. Not a tmpfs over /tmp: that would hide a
        # checkout or a .venv that lives under /tmp from the host's ranks.
        self.tmp_dir(host).mkdir()
        os.chmod(self.tmp_dir(host), 0o1777)
        run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", HOSTNAMES[host],
                  "-f", hdir / "ssh_host_ed25519_key"])
        with open(hdir / "authorized_keys", "a") as f:
            f.write(public)
        os.chmod(hdir / "authorized_keys", 0o600)
        host_key = (hdir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        (hdir / "hosts").write_text(
            "127.0.0.1 localhost\n"
            + "".join(f"{ADDRESSES[h]} {HOSTNAMES[h]}\n" for h in HOSTS))
        (hdir / "sshd_config").write_text(self._sshd_config(host))
        return f"{ADDRESSES[host]},{HOSTNAMES[host]} {' '.join(host_key)}\n"

    def _write_client_files(self) -> None:
        """The lab's ``ssh`` (its config, and the wrapper in ``bin_dir``) and both
        hostfiles."""
        self.ssh_config.write_text(self.ssh_config_text())
        self.bin_dir.mkdir()
        self.ssh.write_text(self.ssh_wrapper_text())
        self.ssh.chmod(0o755)
        self.hostfile.write_text(
            "# The two-host lab (course_lib.lab): one line per host, `ADDRESS slots=N`\n"
            + "".join(f"{ADDRESSES[h]} slots=1\n" for h in HOSTS))
        self.hostfile_json.write_text(
            "[\n" + ",\n".join(f'  {{"ssh": "{ADDRESSES[h]}", "ips": ["{ADDRESSES[h]}"]}}'
                               for h in HOSTS) + "\n]\n")

    def _check_logins(self) -> None:
        """Key login from each host to the other, as mpirun and mlx.launch will do it;
        :class:`LabError` when one fails."""
        for src, dst in [("a", "b"), ("b", "a")]:
            out = self.run(src, str(self.ssh), ADDRESSES[dst], "hostname", timeout=20).stdout
            if out.strip() != HOSTNAMES[dst]:
                raise LabError(f"ssh {src} -> {dst} printed {out!r}, expected "
                               f"{HOSTNAMES[dst]!r}")

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

    def _start_sshd(self, host: str) -> None:
        """Start ``host``'s sshd inside its network namespace, in a UTS namespace with the
        host's name and a mount namespace with its own /etc/hosts (sessions get the
        host's own ``TMPDIR`` from the sshd config)."""
        d = self.dir / host
        script = (f"set -e; hostname {HOSTNAMES[host]}; "
                  f"mount --bind {shlex.quote(str(d / 'hosts'))} /etc/hosts; "
                  f"exec {SSHD} -f {shlex.quote(str(d / 'sshd_config'))} "
                  f"-E {shlex.quote(str(d / 'sshd.log'))}")
        run_tool([SSHD, "-t", "-f", d / "sshd_config"], timeout=10)
        # `ip netns exec` also makes a mount namespace (it remounts /sys for the namespace);
        # sshd forks into the background and this command returns.
        run_tool(["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "--", "/bin/sh",
                  "-c", script], timeout=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.sshd_pid(host) and tcp_listeners(self.ns(host)):
                return
            time.sleep(0.05)
        log = (d / "sshd.log").read_text() if (d / "sshd.log").exists() else ""
        raise LabError(f"sshd of host {host} did not start listening in 10 s: {log.strip()}")

    # --- shapes
    def set_shape(self, shape: str, log=print) -> dict:
        """Shape both directions of the link like ``shape`` (a key of
        :data:`course_lib.lab_shapes.SHAPES`, or ``"none"`` for the bare veth). Bandwidth:
        a tbf root qdisc on each end; latency: a netem qdisc under it when the kernel has
        netem, otherwise not emulated (the returned dict and :meth:`status` say
        ``latency_emulated: False``). Returns the link's state; raises :class:`LabError`."""
        check_shape(shape)
        netem = False
        for host in HOSTS:
            ns = ["ip", "netns", "exec", self.ns(host), "tc"]
            run_tool([*ns, "qdisc", "del", "dev", INTERFACE, "root"], check=False)
            if shape == "none":
                continue
            tbf, delay = qdisc_args(SHAPES[shape], INTERFACE)
            run_tool([*ns, *tbf])
            netem = run_tool([*ns, *delay], check=False).returncode == 0
        link = {"shape": shape,
                "bits_per_second": SHAPES[shape].bits_per_second if shape != "none" else None,
                "latency_seconds": SHAPES[shape].latency_seconds if shape != "none" else None,
                "latency_emulated": netem}
        self._save_state(**link)
        log(describe(shape, netem))
        return link

    def qdiscs(self, host: str) -> str:
        """``tc qdisc show dev lab0`` on ``host``."""
        return run_tool(["ip", "netns", "exec", self.ns(host), "tc", "qdisc", "show", "dev",
                         INTERFACE]).stdout.strip()

    # --- a host's own folder
    def own_folder(self, host: str, path: str | Path) -> Path:
        """Give ``host`` a folder of its own at ``path``, as on a separate machine's disk.

        The hosts share this machine's files; an empty folder of the lab's
        (``DIR/HOST/own/...``, a new one each call) is bind-mounted over ``path`` in the
        mount namespace of ``host``'s sshd, which its ssh sessions, ranks and
        :meth:`host_command` share. They see that folder at ``path``; this machine and the
        other host still see the real one. So ``rsync`` to ``host:path`` copies for real
        (``course_lib.workshop sync``). :meth:`down` removes it. Returns the backing
        folder; raises :class:`LabError`."""
        path = Path(path).resolve()
        (self.dir / host / "own").mkdir(parents=True, exist_ok=True)
        backing = Path(tempfile.mkdtemp(prefix=str(path).strip("/").replace("/", "__") + "-",
                                        dir=self.dir / host / "own"))
        self.run(host, "mount", "--bind", backing, path, cwd="/", timeout=10)
        return backing

    # --- what exists
    def counters(self, host: str = "a") -> dict:
        """Bytes and packets through ``host``'s end of the link so far:
        ``{"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"}``."""
        out = run_tool(["ip", "-n", self.ns(host), "-s", "-j", "link", "show",
                        INTERFACE]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"rx_bytes": stats["rx"]["bytes"], "tx_bytes": stats["tx"]["bytes"],
                "rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"]}

    def status(self) -> dict:
        """What exists now: namespaces, sshd PIDs, listeners in each namespace, the link's
        shape and counters, the hostfiles, and listeners on lab addresses *outside* the
        namespaces (should be none)."""
        names = set(netns_names())
        state = self._state()
        hosts = {}
        for host in HOSTS:
            present = self.ns(host) in names
            hosts[host] = {
                "namespace": self.ns(host), "exists": present, "address": ADDRESSES[host],
                "hostname": HOSTNAMES[host], "sshd_pid": self.sshd_pid(host),
                "listening": tcp_listeners(self.ns(host)) if present else [],
                "processes": len(netns_pids(self.ns(host))) if present else 0,
                "counters": self.counters(host) if present else None,
            }
        outside = [a for a in tcp_listeners() if a.startswith("10.77.0.")]
        return {"name": self.name, "up": self.is_up(), "dir": str(self.dir),
                "dir_exists": self.dir.exists(), "hosts": hosts,
                "shape": state.get("shape"), "latency_emulated": state.get("latency_emulated"),
                "hostfile": str(self.hostfile), "hostfile_json": str(self.hostfile_json),
                "listening_outside_namespaces": outside}

    def leftovers(self) -> list[str]:
        """Anything of this lab that still exists (empty after :meth:`down`)."""
        left = []
        names = set(netns_names())
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

    # --- bring down
    def down(self, log=print) -> list[str]:
        """Remove everything the lab made: its processes (sshd, ranks, prted), namespaces
        and link, the state folder; and ``/run/sshd`` and ``/run/netns`` if ``up`` created
        them and nothing else uses them. Works on a half-built lab and when nothing is
        there. Returns what it removed; raises :class:`LabError` if something stays."""
        state = self._state()
        names = netns_names()
        removed = self._stop_processes(names)
        for host in HOSTS:
            if self.ns(host) in names:
                run_tool(["ip", "netns", "del", self.ns(host)])
                removed.append(f"namespace {self.ns(host)}")
        if self.dir.exists():
            shutil.rmtree(self.dir)
            removed.append(str(self.dir))
        if state.get("created_state_root"):
            with contextlib.suppress(OSError):
                self.state_root.rmdir()  # only when empty: other labs may be up
        if state.get("created_privsep_dir") and not sshd_running():
            with contextlib.suppress(OSError):
                Path("/run/sshd").rmdir()
                removed.append("/run/sshd")
        if (state.get("netns_dir_existed") is False and Path("/run/netns").exists()
                and remove_netns_dir()):
            removed.append("/run/netns")  # made by the first `ip netns add` of up
        left = self.leftovers()
        if left:
            raise LabError(f"lab {self.name} down left: {'; '.join(left)}")
        log(f"lab {self.name} down: removed "
            + (", ".join(removed) if removed else "nothing (it was not up)"))
        return removed

    def _stop_processes(self, names: list[str]) -> list[str]:
        """Stop the sshds and every process inside the lab's namespaces (those of them in
        ``names``, the namespaces that exist). Returns ``["N processes"]``, or ``[]`` when
        none ran; raises :class:`LabError` when some do not stop."""
        pids = []
        for host in HOSTS:
            pid = self.sshd_pid(host)
            if pid:
                pids.append(pid)
            if self.ns(host) in names:
                pids += netns_pids(self.ns(host))
        pids = sorted(set(pids) - {os.getpid()})
        if not pids:
            return []
        stuck = terminate(pids)
        if stuck:
            raise LabError(f"processes {stuck} of lab {self.name} did not stop")
        return [f"{len(pids)} processes"]

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


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``[--name NAME] WHAT [options]`` (see the module docstring)."""
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
    return parser


def _run_on_hosts(lab: Lab, args, parser: argparse.ArgumentParser) -> int:
    """``exec``, ``mpirun`` and ``mlx-launch``: run the command after ``--``; return its
    exit status."""
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the command after --")
    if args.what != "exec" and cmd[0] in ("python", "python3"):
        # Remote ranks start from a fresh ssh login: no activated venv there.
        cmd = [sys.executable, *cmd[1:]]
        print(f"(python: {sys.executable}, the same path on both hosts)", file=sys.stderr)
    if args.what == "exec":
        full = lab.host_command(args.host, *cmd)
    elif args.what == "mpirun":
        full = lab.mpirun_command(2, *cmd)
    else:
        full = lab.mlx_launch_command(*cmd)
    return subprocess.run(full, env=lab.env()).returncode


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
            return _run_on_hosts(lab, args, parser)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
