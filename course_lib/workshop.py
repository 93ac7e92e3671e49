"""A classroom workshop from the command line: from a list of laptops to one fine-tune.

Run on the instructor's machine, from the course's checkout; it is rank 0 and writes the
adapters. The steps, in order (``docs/WORKSHOP.md`` is the instructor's guide)::

    python -m course_lib.workshop hosts 192.168.2.1 192.168.2.2:2 ...   # or --file FILE
    python -m course_lib.workshop keys       # passwordless SSH, with the fix for each failure
    python -m course_lib.workshop sync       # this checkout to every host (rsync), set-up there
    python -m course_lib.workshop check      # course_lib.doctor on every host: one table
    python -m course_lib.workshop run -- --iters 20    # the fine-tune across all hosts

Each step reuses a piece of the course: hostfiles are parsed, validated and converted by
:mod:`course_lib.hostfile`; ``check`` runs :mod:`course_lib.doctor` on every host and its
all-reduce between rank 0 and each host; ``run`` is :func:`course_lib.launch.mpirun_command`
with both interface options. The copying is ``rsync`` over OpenSSH and the set-up is the
README's ``bash scripts/setup.sh``. The hostfiles live in ``runs/workshop/`` of the
checkout (``--hostfile`` to choose another place), with the logs of ``sync``.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from course_lib.doctor import Report, check_all_reduce, startup_failure
from course_lib.hostfile import (Host, HostfileError, parse_mlx_json, parse_openmpi,
                                 read_hostfile, to_mlx_json, to_openmpi, total_slots)
from course_lib.launch import child_env, mpirun_command
from course_lib.mpi import MPIError, start_relaying_signals
from course_lib.ssh import ssh_options

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HOSTFILE = REPO / "runs" / "workshop" / "hostfile"
SSH_OPTIONS = ssh_options()  # doctor's too: no password prompt, 10 s to answer, new keys taken
# What rsync leaves out: git's folder (a worktree's .git is a pointer that means nothing
# elsewhere), the virtual environment (setup.sh builds one there; --copy-venv sends it),
# run outputs and caches. Excluded paths there are kept, not deleted.
EXCLUDES = ["/.git", "/.venv", "/runs", "__pycache__", ".ipynb_checkpoints", ".pytest_cache",
            ".hypothesis"]


class WorkshopError(RuntimeError):
    """A step cannot go on; the message says why and what to do (one line)."""


# ----------------------------------------------------------------------------- hosts

def parse_entries(lines: list[str], source: str) -> list[Host]:
    """Hosts from ``ADDR[:SLOTS]`` entries, one per line (``#`` comments, blank lines and
    OpenMPI's ``ADDR slots=N`` allowed too), validated by
    :func:`course_lib.hostfile.parse_openmpi`; errors name ``source`` and the line
    (the argument's position for the command line). An IPv6 address takes no ``:SLOTS``."""
    converted = []
    for line in lines:
        body = line.split("#", 1)[0].strip()
        name, _, slots = body.rpartition(":")
        if body and " " not in body and name and ":" not in name:
            body = f"{name} slots={slots}"
        converted.append(body)
    return parse_openmpi("\n".join(converted) + "\n", source)


def read_entries(entries: list[str], file: Path | None) -> list[Host]:
    """Hosts from ``file`` when given (``ADDR[:SLOTS]`` lines, an OpenMPI hostfile, or an
    ``mlx.launch`` JSON hostfile), else from the command line's ``entries``
    (:func:`parse_entries`). Raises :class:`HostfileError` naming the file or argument."""
    if not file:
        return parse_entries(entries, "<command line> argument")
    try:
        text = file.read_text()
    except OSError as e:
        raise HostfileError(f"{file}: cannot read it ({e.strerror})") from None
    if text.lstrip()[:1] in ("[", "{"):
        return parse_mlx_json(text, str(file))
    return parse_entries(text.splitlines(), str(file))


def _addresses(name: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, None)})
    except socket.gaierror:
        return []


def is_this_machine(address: str) -> bool:
    """Whether ``address`` (an IP address) belongs to this machine: a socket can be bound
    to it only then."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
            return True
        except OSError:
            return False


def resolve_hosts(hosts: list[Host]) -> list[Host]:
    """Give every host its IP address (the ring backend and the interface choice need them)
    and put this machine first (rank 0 runs where ``run`` starts and writes the files).
    Raises :class:`WorkshopError` for a name that does not resolve, for no host being this
    machine, and for a loopback address among several hosts (the others cannot reach it)."""
    for h in hosts:
        if not h.ips:
            h.ips = [a for a in _addresses(h.name) if ":" not in a][:1] or _addresses(h.name)[:1]
            if not h.ips:
                raise WorkshopError(f"host {h.name} does not resolve: give its IP address")
    local = [h for h in hosts if is_this_machine(h.ips[0])]
    if not local:
        raise WorkshopError(
            "none of the hosts is this machine: add its own address (rank 0 runs here and "
            "writes the adapters); `ip -4 addr` (Linux) or `ipconfig getifaddr en0` (macOS)")
    if len(hosts) > 1:
        loop = [h.name for h in hosts if ipaddress.ip_address(h.ips[0]).is_loopback]
        if loop:
            raise WorkshopError(f"{', '.join(loop)} is a loopback address, which other hosts "
                                "cannot reach: give this machine's address on the shared network")
    if local[0] is not hosts[0]:
        print(f"hosts: {local[0].name} is this machine: it goes first, as rank 0",
              file=sys.stderr)
    return [local[0], *[h for h in hosts if h is not local[0]]]


def json_path(hostfile: Path) -> Path:
    """Where the ``mlx.launch`` form is written next to the OpenMPI ``hostfile``."""
    return hostfile.with_name(hostfile.name + ".json")


def write_hostfiles(hosts: list[Host], hostfile: Path) -> tuple[Path, Path]:
    """Write ``hostfile`` (OpenMPI form) and ``hostfile.json`` (mlx.launch form), then read
    both back with :func:`course_lib.hostfile.read_hostfile` to be sure they parse to the
    same hosts. Returns both paths."""
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text("# written by python -m course_lib.workshop hosts; rank 0 first\n"
                        + to_openmpi(hosts))
    json_path(hostfile).write_text(to_mlx_json(hosts))
    for path in (hostfile, json_path(hostfile)):
        back = read_hostfile(path)
        if [(h.name, h.slots) for h in back] != [(h.name, h.slots) for h in hosts]:
            raise WorkshopError(f"{path}: reads back as {back}, not as written")
    return hostfile, json_path(hostfile)


def load_hosts(hostfile: Path) -> list[Host]:
    """The hosts ``hosts`` wrote, addresses resolved, rank 0 first. Raises
    :class:`HostfileError` naming the file (and what to run) when it is missing or bad."""
    if not hostfile.exists():
        raise HostfileError(f"{hostfile}: no such hostfile: run `python -m "
                            "course_lib.workshop hosts ADDR[:SLOTS] ...` first")
    return resolve_hosts(read_hostfile(hostfile))


def cmd_hosts(hosts: list[Host], hostfile: Path) -> int:
    """The ``hosts`` step: resolve ``hosts`` (this machine first), write both hostfiles at
    ``hostfile``, print the ranks and the network they will share."""
    hosts = resolve_hosts(hosts)
    written = write_hostfiles(hosts, hostfile)
    n = total_slots(hosts)
    print(f"hosts: {len(hosts)} host{'s' * (len(hosts) > 1)}, {n} rank{'s' * (n > 1)}; "
          f"rank 0 on {hosts[0].name} (this machine)")
    for h in hosts:
        print(f"  {h.name}  slots={h.slots}  {h.ips[0]}")
    try:
        print(f"network: {choose_network(hosts) or 'this machine only'}")
    except WorkshopError as e:
        print(f"warning: {e}")
    print(f"wrote {written[0]} (mpirun) and {written[1]} (mlx.launch)\n"
          "next: python -m course_lib.workshop keys")
    return 0


# ----------------------------------------------------------------------------- networks

def local_networks() -> list[tuple[str, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    """This machine's interfaces and their addresses with prefix, e.g. ``("lab0",
    IPv4Interface("10.77.0.1/24"))``: from ``ip -j addr`` (iproute2) on Linux, ``ifconfig``
    on macOS. Empty when neither works."""
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                             timeout=10).stdout
        try:
            return [(link["ifname"], ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}"))
                    for link in json.loads(out or "[]") for a in link.get("addr_info", [])]
        except (ValueError, KeyError):
            return []
    if shutil.which("ifconfig"):
        found, name = [], None
        out = subprocess.run(["ifconfig"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line and not line[0].isspace():
                name = line.split(":", 1)[0]
            m = re.match(r"\s+inet (\S+) netmask 0x([0-9a-f]+)", line)
            if m and name:
                prefix = bin(int(m.group(2), 16)).count("1")
                found.append((name, ipaddress.ip_interface(f"{m.group(1)}/{prefix}")))
            m = re.match(r"\s+inet6 ([^\s%]+)\S* prefixlen (\d+)", line)
            if m and name:
                found.append((name, ipaddress.ip_interface(f"{m.group(1)}/{m.group(2)}")))
        return found
    return []


def choose_network(hosts: list[Host]) -> str | None:
    """The network all ranks should talk over, as ``ADDRESS/PREFIX`` for OpenMPI's
    ``btl_tcp_if_include`` and ``oob_tcp_if_include``: the network of this machine's
    interface that holds rank 0's address, which must hold every other host's address
    too. A subnet, not an interface name, because the name differs between laptops
    (``en0``, ``bridge0``, ``wlp2s0``). None for one host. Raises :class:`WorkshopError`
    when a host is not on that network (give ``--interface``)."""
    if len(hosts) == 1:
        return None
    mine = ipaddress.ip_address(hosts[0].ips[0])
    match = [(name, iface) for name, iface in local_networks() if iface.ip == mine]
    if not match:
        raise WorkshopError(f"no interface of this machine has {mine}: give --interface")
    name, iface = match[0]
    away = [h.name for h in hosts[1:] if ipaddress.ip_address(h.ips[0]) not in iface.network]
    if away:
        raise WorkshopError(f"{', '.join(away)} not on {iface.network} ({name}, this machine's "
                            f"{mine}): put every laptop on one network, or give --interface")
    return str(iface.network)


# ----------------------------------------------------------------------------- ssh

def ssh(host: str, command: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """``ssh [SSH_OPTIONS] host command`` (``command`` is one shell line, quoted by the
    caller), output captured, stdin closed. A time-out comes back as exit status 124."""
    try:
        return subprocess.run(["ssh", *SSH_OPTIONS, host, command], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 124, "", f"no answer in {timeout:.0f} s")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def ssh_problem(host: str) -> str | None:
    """None when ``ssh host true`` works without a password; otherwise ssh's own reason
    (its last line of stderr, e.g. ``Permission denied (publickey)``)."""
    proc = ssh(host, "true", timeout=20)
    return None if proc.returncode == 0 else _last_line(proc.stderr)


def key_fix(host: str, why: str) -> list[str]:
    """The commands that fix a failed login to ``host``, by ssh's reason ``why``."""
    if "Host key verification failed" in why or "IDENTIFICATION HAS CHANGED" in why:
        return [f"ssh-keygen -R {host}    # the laptop was reinstalled: forget its old key",
                f"ssh {host} true          # accept the new one"]
    if "Connection refused" in why:
        return [f"# on {host}: turn on its SSH server (macOS: System Settings > General > "
                "Sharing > Remote Login; Debian/Ubuntu: sudo apt-get install openssh-server)"]
    if any(s in why for s in ("timed out", "No route", "unreachable", "no answer",
                              "Could not resolve")):
        return [f"# {host} does not answer: is it on, awake and on this network? "
                f"(ping {host}); then run `keys` again"]
    keys = [p for p in (Path.home() / ".ssh").glob("id_*.pub")]
    lines = [] if keys else ['ssh-keygen -t ed25519 -N "" -f ~/.ssh/id_ed25519    # once']
    return lines + [f"ssh-copy-id {host}    # asks for {host}'s password once"]


def cmd_keys(hosts: list[Host]) -> int:
    remote = hosts[1:]
    print(f"keys: passwordless SSH from this machine ({hosts[0].name}) to {len(remote)} "
          f"host(s)")
    with ThreadPoolExecutor(max_workers=min(16, len(remote) or 1)) as pool:
        problems = dict(zip([h.name for h in remote], pool.map(ssh_problem,
                                                                [h.name for h in remote])))
    for name, why in problems.items():
        print(f"{'ok' if why is None else 'FAIL':4}  {name}: "
              f"{'passwordless login works' if why is None else why}")
    failed = {n: w for n, w in problems.items() if w is not None}
    if failed:
        print(f"\n{len(failed)} host(s) without key login. Run on this machine:")
        for name, why in failed.items():
            for line in key_fix(name, why):
                print(f"  {line}")
        print("then: python -m course_lib.workshop keys")
        return 1
    print("all hosts take key login; next: python -m course_lib.workshop sync")
    return 0


# ----------------------------------------------------------------------------- sync

def _venv() -> Path | None:
    """The virtual environment this Python runs in, when it is not the checkout's .venv
    (setup.sh there must build the same one: ``COURSE_VENV``)."""
    prefix = Path(sys.prefix)
    return prefix if sys.prefix != sys.base_prefix and prefix != REPO / ".venv" else None


def sync_fix(why: str) -> str:
    """What to do about a failed sync step, by its output ``why``."""
    if any(s in why for s in ("Failed to resolve", "Network is unreachable",
                              "No matching distribution", "Temporary failure")):
        return ("that host cannot reach the package registry: put it on the internet for "
                "set-up, or run `sync --copy-venv` from an identical machine")
    if "not a copy of the course" in why:
        return "move that folder away on the host, or run the course from another path"
    if "rsync" in why and ("not found" in why or "No such file" in why):
        return "install rsync there (Debian/Ubuntu: sudo apt-get install rsync)"
    if "sudo" in why and ("password" in why or "terminal" in why):
        return "run `bash scripts/setup.sh` on that laptop by hand once (it asks for sudo)"
    if any(w in why for w in ("Permission denied", "Host key", "connect to host")):
        return "python -m course_lib.workshop keys"
    return "read the log named above, fix it on that host, then sync again"


def sync_host(host: Host, model: str | None, copy_venv: bool, log_dir: Path) -> dict:
    """Copy this checkout to ``host`` at the same path (rsync over ssh, ``--delete``), run
    ``bash scripts/setup.sh`` there, then build ``model`` there (``python -m
    course_lib.models``). Returns ``{"host", "ok", "step", "why", "seconds": {step: s}}``;
    the whole output goes to ``log_dir/sync-HOST.log``."""
    result = {"host": host.name, "ok": False, "step": None, "why": "", "seconds": {}}
    log = log_dir / f"sync-{host.name}.log"
    here = shlex.quote(str(REPO))
    venv = _venv()
    env = f"COURSE_VENV={shlex.quote(str(venv))} " if venv else ""
    steps = [
        ("prepare", ["ssh", *SSH_OPTIONS, host.name,
                     f"if [ -n \"$(ls -A {here} 2>/dev/null)\" ] && "
                     f"[ ! -e {here}/scripts/setup.sh ]; then echo "
                     f"'{REPO} exists there and is not a copy of the course' >&2; exit 3; fi; "
                     f"mkdir -p {here} || exit 5; command -v rsync >/dev/null || "
                     "{ echo 'rsync not found there' >&2; exit 4; }"]),
        ("copy", ["rsync", "-a", "--delete", "--stats", "-e", shlex.join(["ssh", *SSH_OPTIONS]),
                  *[f"--exclude={e}" for e in EXCLUDES if not (copy_venv and e == "/.venv")],
                  f"{REPO}/", f"{host.name}:{REPO}/"]),
        ("set-up", ["ssh", *SSH_OPTIONS, host.name, f"cd {here} && {env}bash scripts/setup.sh"]),
    ]
    if model:
        steps.append(("model", ["ssh", *SSH_OPTIONS, host.name, shlex.join(
            [sys.executable, "-m", "course_lib.models", model])]))
    with open(log, "w") as out:
        for step, cmd in steps:
            tic = time.monotonic()
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                      stdin=subprocess.DEVNULL)
                rc, text = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired:
                rc, text = 124, f"{step} did not finish in 1800 s"
            out.write(text)
            result["seconds"][step] = time.monotonic() - tic
            if step == "copy":
                m = re.search(r"Number of regular files transferred: ([\d,]+)", text)
                result["files"] = int(m.group(1).replace(",", "")) if m else None
            if rc != 0:
                errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
                result.update(step=step, why=(errors[-1].strip() if errors else _last_line(text)),
                              log=str(log), fix=sync_fix(text))
                return result
    result["ok"] = True
    return result


def cmd_sync(hosts: list[Host], model: str | None, copy_venv: bool, log_dir: Path) -> int:
    if not (REPO / "scripts" / "setup.sh").exists():
        raise WorkshopError(f"{REPO} is not a checkout of the course (no scripts/setup.sh)")
    if shutil.which("rsync") is None:
        raise WorkshopError("rsync not found on this machine: bash scripts/setup.sh installs "
                            "it (Debian/Ubuntu), macOS has it")
    remote = hosts[1:]
    log_dir.mkdir(parents=True, exist_ok=True)
    steps = "copy, set-up" + (f", model {model}" if model else "")
    print(f"sync: {REPO} to {len(remote)} host(s) in parallel ({steps}); logs in {log_dir}")
    print(f"ok    {hosts[0].name}: this machine, the copy's source")
    results = []
    with ThreadPoolExecutor(max_workers=min(16, len(remote) or 1)) as pool:
        futures = [pool.submit(sync_host, h, model, copy_venv, log_dir) for h in remote]
        for future in as_completed(futures):
            r = future.result()
            results.append(r)
            took = ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
            if r["ok"]:
                files = f"{r.get('files')} files changed; " if r.get("files") is not None else ""
                print(f"ok    {r['host']}: ready ({files}{took})", flush=True)
            else:
                print(f"FAIL  {r['host']}: {r['step']} failed: {r['why']} ({took})", flush=True)
    failed = [r for r in results if not r["ok"]]
    print(f"\nsync: {len(hosts) - len(failed)} of {len(hosts)} hosts ready"
          + (f"; {len(failed)} failed:" if failed else "; next: python -m course_lib.workshop check"))
    for r in failed:
        print(f"  {r['host']}: {r['step']}: {r['why']}\n    log: {r['log']}\n"
              f"    fix: {r['fix']}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- check

def doctor_on(host: Host, local: bool) -> dict:
    """``python -m course_lib.doctor --ranks 2 --json`` on ``host`` (over ssh unless
    ``local``): MLX, BLAS, OpenMPI and a 2-rank all-reduce on that host alone: ``{"ssh": None or ssh's reason, "doctor": the JSON or None, "why": ...}``."""
    cmd = [sys.executable, "-m", "course_lib.doctor", "--ranks", "2", "--json"]
    if local:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    else:
        why = ssh_problem(host.name)
        if why:
            return {"ssh": why, "doctor": None, "why": why}
        proc = ssh(host.name, f"cd {shlex.quote(str(REPO))} 2>/dev/null; {shlex.join(cmd)}",
                   timeout=300)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not found:
        return {"ssh": None, "doctor": None,
                "why": f"{sys.executable} cannot run course_lib.doctor there "
                       f"({_last_line(proc.stderr)})"}
    return {"ssh": None, "doctor": json.loads(found[-1]), "why": ""}


def _result(doc: dict, check: str) -> dict | None:
    return next((r for r in doc["results"] if r["check"] == check), None)


def _cell(doc: dict, check: str, short=lambda r: "") -> str:
    r = _result(doc, check)
    return "-" if r is None else f"{r['status']} {short(r)}".strip()


def _blas_word(r: dict) -> str:
    d = r["detail"].lower()
    return "openblas" if "openblas" in d else "accelerate" if "accelerate" in d else "reference"


def host_row(host: Host, found: dict, mine: dict | None, rank0: bool, problems: list) -> dict:
    """One row of the ``check`` table from what :func:`doctor_on` ``found`` on ``host``;
    appends ``(host, what, fix)`` to ``problems`` for every failure and warning."""
    row = {"host": host.name, "SSH": "-" if rank0 else "FAIL" if found["ssh"] else "PASS",
           "ok": False}
    doc = found["doctor"]
    if found["ssh"]:
        problems.append((host.name, f"SSH: {found['ssh']}", "python -m course_lib.workshop keys"))
        return row
    if doc is None:
        problems.append((host.name, found["why"], "python -m course_lib.workshop sync"))
        return {**row, "MLX": "FAIL"}
    v = doc["versions"] or {}
    row["MLX"] = _cell(doc, "MLX", lambda r: v.get("mlx", ""))
    row["BLAS"] = _cell(doc, "BLAS", _blas_word)
    row["OpenMPI"] = _cell(doc, "OpenMPI",
                           lambda r: (re.findall(r"Open MPI (\S+)", r["detail"]) or [""])[0])
    if _result(doc, "all-reduce")["status"] == "FAIL" and row["OpenMPI"].startswith("PASS"):
        row["OpenMPI"] = "FAIL mpirun"  # installed, but a 2-rank run on that host failed
    for r in doc["results"]:
        if r["status"] != "PASS":
            problems.append((host.name, f"{r['check']}: {r['detail']}", r["hint"] or "-"))
    if rank0:
        row["versions"] = "rank 0"
    elif v == mine:
        row["versions"] = "match"
    else:
        row["versions"] = "DIFFER"
        diff = ", ".join(f"{k} {v.get(k)} there, {(mine or {}).get(k)} on rank 0"
                         for k in sorted(set(v) | set(mine or {}))
                         if v.get(k) != (mine or {}).get(k))
        problems.append((host.name, f"versions: {diff}",
                         "python -m course_lib.workshop sync (the same commit and set-up "
                         "everywhere)"))
    row["ok"] = row["versions"] != "DIFFER" and not any(
        r["status"] == "FAIL" for r in doc["results"])
    return row


def link_to_rank0(hosts: list[Host], host: Host, interface: str | None,
                  problems: list) -> tuple[str, bool]:
    """``(cell, ok)``: doctor's all-reduce between rank 0 and ``host`` alone (2 ranks),
    bandwidth in GB/s (1e9 bytes/s) and latency in microseconds, or why it failed."""
    report = Report(out=io.StringIO())
    with tempfile.TemporaryDirectory() as tmp:
        pair = Path(tmp) / "hostfile"
        pair.write_text(to_openmpi([Host(hosts[0].name), Host(host.name)]))
        bench = check_all_reduce(report, 2, str(pair), interface=interface)
    results = {r["check"]: r for r in report.results}
    if bench is None:
        detail = results["all-reduce"]["detail"]
        network = any(w in detail for w in ("interface", "connection", "daemon"))
        problems.append((host.name, f"all-reduce with rank 0: {detail}",
                         "leave out --interface (check picks the hosts' common network), or "
                         "give the ADDRESS/PREFIX all laptops share; a firewall must let the "
                         "hosts connect on any port" if network else results["all-reduce"]["hint"]))
        return "FAIL", False
    link = results["link speed"]
    if link["status"] != "PASS":
        problems.append((host.name, f"link speed: {link['detail']}", link["hint"]))
    return (f"{link['status']} {bench['bus_gbps']:.2f} GB/s, "
            f"{bench['latency_seconds'] * 1e6:.0f} us"), True


def cmd_check(hosts: list[Host], interface: str | None) -> int:
    interface = interface or choose_network(hosts)
    print(f"check: course_lib.doctor on {len(hosts)} host(s); all-reduce with rank 0 over "
          f"{interface or 'this machine'}", flush=True)
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        found = list(pool.map(doctor_on, hosts, [True] + [False] * (len(hosts) - 1)))
    mine = (found[0]["doctor"] or {}).get("versions")
    problems: list[tuple[str, str, str]] = []
    rows = [host_row(h, f, mine, i == 0, problems) for i, (h, f) in enumerate(zip(hosts, found))]
    rows[0]["to rank 0"] = "-"
    # One host at a time with rank 0: which laptop is slow or unreachable.
    for h, row in zip(hosts[1:], rows[1:]):
        if row["ok"] and rows[0]["ok"]:
            row["to rank 0"], row["ok"] = link_to_rank0(hosts, h, interface, problems)
        else:
            row["to rank 0"] = "skipped"
    columns = ["host", "SSH", "MLX", "BLAS", "OpenMPI", "versions", "to rank 0"]
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in columns}
    for r in [dict(zip(columns, columns)), *rows]:
        print("  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in columns).rstrip())
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for host, what, fix in problems:
            print(f"  {host}: {what}\n    fix: {fix}")
    failed = [r["host"] for r in rows if not r["ok"]]
    print(f"\ncheck: {len(failed)} host(s) failed: {', '.join(failed)}" if failed else
          "\ncheck: all hosts ready; next: python -m course_lib.workshop run")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- run

def run_command(hosts: list[Host], hostfile: Path, fine_tune_args: list[str],
                interface: str | None = None, env: list[str] = ()) -> list[str]:
    """The ``mpirun`` of the fine-tune across ``hosts``: one rank per slot, rank 0 here,
    ``btl_tcp_if_include``/``oob_tcp_if_include`` set to ``interface`` (default
    :func:`choose_network`; :func:`course_lib.mpi.interface_options`), ``--prefix`` (where
    ``prted`` is on every host), ``--bind-to none`` (Open MPI pins each of 2 ranks to one core;
    a rank per laptop should use all of its cores), ``-x NAME=VALUE`` for each of ``env``
    (remote ranks get only what is forwarded), and ``--adapter-path
    runs/workshop/adapters`` unless the arguments name one. One slot in all (the others
    left): the fine-tune as one plain process, ``env`` set with ``env(1)``."""
    interface = interface or choose_network(hosts)
    args = list(fine_tune_args)
    if "--adapter-path" not in args:
        args += ["--adapter-path", str(REPO / "runs" / "workshop" / "adapters")]
    for item in env:
        if "=" not in item:
            raise WorkshopError(f"--env {item!r}: expected NAME=VALUE")
    program = [sys.executable, "-m", "course_lib.fine_tune", *args]
    if total_slots(hosts) == 1:  # one rank: plain python (MLX's MPI backend wants 2 or more)
        return ["env", *env, *program] if env else program
    cmd = mpirun_command(total_slots(hosts), hostfile=str(hostfile), interface=interface)
    return cmd + ["--bind-to", "none", *[x for item in env for x in ("-x", item)], *program]


def rank_hosts(hosts: list[Host]) -> list[str]:
    """The host of each rank, by OpenMPI's default placement (``--map-by slot``: each host's
    slots filled in hostfile order)."""
    return [h.name for h in hosts for _ in range(h.slots)]


def who_failed(output: str, hosts: list[Host]) -> tuple[str | None, str] | None:
    """``(host, what happened)`` of the rank that ended an ``mpirun``, read from its
    ``output`` (Open MPI 5's wording, and 4.1's; and the fine-tune's ``--step-timeout``
    message, whose host is unknown: None), or None when it says nothing of the kind.

    The host is the hostfile's entry for that rank (:func:`rank_hosts`): Open MPI names a
    killed rank's node by that host's own short host name (``lab-b``), which is not what
    the hostfile (and ``hosts``) lists; that name is used only when the rank is not in
    ``hosts``."""
    ranks = rank_hosts(hosts)
    text = " ".join(output.replace("\0", "").split())
    m = re.search(r"process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+)"
                  r"(?: \(([^)]*)\))?", text)
    if m:
        rank = int(m.group(1))
        host = ranks[rank] if rank < len(ranks) else m.group(2)
        return host, f"rank {rank} on {host} was killed (signal {m.group(3)}" + (
            f", {m.group(4)})" if m.group(4) else ")")
    # 5.x names the process [prterun-HOST-PID@1,RANK], 4.1 [[JOBID,1],RANK].
    m = re.search(r"Process name: \[(?:\[\d+,\d+\]|[^\s\],]+),(\d+)\] Exit code: (\d+)", text)
    if m and int(m.group(1)) < len(ranks):
        host = ranks[int(m.group(1))]
        return host, f"rank {m.group(1)} on {host} exited with code {m.group(2)}"
    m = re.search(r"rank (\d+): no step finished for (\d+) s", text)
    if m and int(m.group(1)) < len(ranks):
        return None, (f"rank {m.group(1)} ({ranks[int(m.group(1))]}) waited {m.group(2)} s "
                      "for a step: another host stopped answering")
    return None


def cmd_run(hosts, hostfile, args, interface, env, dry_run) -> int:
    cmd = run_command(hosts, hostfile, args, interface, env)
    print(f"run: {shlex.join(cmd)}", flush=True)
    if dry_run:
        return 0
    tail: deque[str] = deque(maxlen=400)  # mpirun's own messages come at the end
    # Ctrl-C stops every rank after its step, with a checkpoint (course_lib.mpi).
    proc, relay = start_relaying_signals(cmd, relay=True, cwd=REPO, env=child_env(),
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, bufsize=1)
    try:
        with proc:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                tail.append(line)
    finally:
        relay.close()
    if proc.returncode != 0:
        explain_failure(proc.returncode, "".join(tail), hosts, args, interface,
                        signalled=bool(relay.received))
    return proc.returncode


def explain_failure(code: int, output: str, hosts: list[Host], args: list[str],
                    interface: str | None, signalled: bool) -> None:
    """Print, on stderr, why ``run``'s ``mpirun`` ended with ``code`` and what to do next,
    read from its ``output``: ranks that never started (a network or a daemon problem), a
    stop you asked for (``signalled``: Ctrl-C or SIGTERM), or a rank that died (which host,
    how to go on without it)."""
    why = startup_failure(output, interface or choose_network(hosts))
    if why:
        print(f"\nrun: mpirun exited {code} before the fine-tune started: {why}."
              "\n  to see which host is the problem: python -m course_lib.workshop check"
              + (f" --interface {interface}" if interface else ""), file=sys.stderr)
        return
    again = shlex.join(["python", "-m", "course_lib.workshop", "run", "--", "--resume",
                        *[a for a in args if a != "--resume"]])
    if "Stopped by SIG" in output:  # Ctrl-C or SIGTERM: every rank stopped and saved
        print(f"\nrun: stopped; continue from the checkpoint: {again}", file=sys.stderr)
        return
    if signalled:
        print("\nrun: stopped before the fine-tune saved a checkpoint", file=sys.stderr)
        return
    found = who_failed(output, hosts)
    others = [h for h in hosts if found is None or h.name != found[0]]
    left = found[0] if found and found[0] else "a laptop"
    if len(hosts) == 1 or (found and found[0] == hosts[0].name):
        found = found or (hosts[0].name, "the fine-tune failed")
        print(f"\nrun: exited {code}: {found[1]} (this machine): its messages are above",
              file=sys.stderr)
        return
    print(f"\nrun: mpirun exited {code}"
          + (f": {found[1]}." if found else ".")
          + "\n  to see which host is the problem: python -m course_lib.workshop check"
          + f"\n  if {left} left, list the others: python -m course_lib.workshop hosts "
          + " ".join(f"{h.name}:{h.slots}" for h in others)
          + f"\n  then continue from the last checkpoint: {again}", file=sys.stderr)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """The command line: ``[--hostfile PATH] STEP [options]``, one sub-command per step."""
    parser = argparse.ArgumentParser(prog="python -m course_lib.workshop",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--hostfile", type=Path, default=DEFAULT_HOSTFILE,
                        help="the OpenMPI hostfile the steps share (its .json is next to it; "
                        f"default {DEFAULT_HOSTFILE.relative_to(REPO)})")
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("hosts", help="write both hostfiles from ADDR[:SLOTS] entries")
    p.add_argument("entries", nargs="*", metavar="ADDR[:SLOTS]")
    p.add_argument("--file", type=Path, help="one ADDR[:SLOTS] per line (or a hostfile)")
    sub.add_parser("keys", help="check passwordless SSH; print the fix for each failure")
    p = sub.add_parser("sync", help="rsync this checkout to every host, run setup.sh there")
    p.add_argument("--model", default="smollm2", help="model to build on every host after "
                   "set-up (default smollm2; 'none' to skip)")
    p.add_argument("--copy-venv", action="store_true", help="copy .venv too (identical "
                   "machines only: same OS and Python; for hosts without internet)")
    p = sub.add_parser("check", help="course_lib.doctor on every host, in one table")
    p.add_argument("--interface", help="ADDRESS/PREFIX or interface name (default: the "
                   "network of this machine's address in the hostfile)")
    p = sub.add_parser("run", help="the fine-tune across all hosts: run -- FINE_TUNE_ARGS")
    p.add_argument("--interface", help="as for check")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for every rank (mpirun -x)")
    p.add_argument("--dry-run", action="store_true", help="print the mpirun command only")
    p.add_argument("args", nargs=argparse.REMAINDER, help="python -m course_lib.fine_tune "
                   "options, after --")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    hostfile = args.hostfile.resolve()
    try:
        if args.step == "hosts":
            if args.file and args.entries:
                parser.error("give ADDR[:SLOTS] entries or --file, not both")
            if not (args.file or args.entries):
                parser.error("give ADDR[:SLOTS] entries, or --file FILE")
            return cmd_hosts(read_entries(args.entries, args.file), hostfile)
        hosts = load_hosts(hostfile)
        if args.step == "keys":
            return cmd_keys(hosts)
        if args.step == "sync":
            return cmd_sync(hosts, None if args.model == "none" else args.model,
                            args.copy_venv, hostfile.parent / "logs")
        if args.step == "check":
            return cmd_check(hosts, args.interface)
        rest = args.args[1:] if args.args[:1] == ["--"] else args.args
        return cmd_run(hosts, hostfile, rest, args.interface, args.env, args.dry_run)
    except (HostfileError, WorkshopError, MPIError) as e:
        print(f"workshop {args.step}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
