"""The commands the two-host lab builds for its hosts: a command run on host a or b, ``ssh``
from one host to the other, ``mpirun`` and ``mlx.launch`` across both, with the
environment to run them in, and the ``ssh`` client files they log in with.

:class:`LabCommands` is a mixin of :class:`course_lib.lab.Lab`: ``lab.mpirun_command(2,
...)`` and the others, once ``lab.up()`` has built the hosts.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from course_lib import launch
from course_lib.lab_system import (ADDRESSES, CLEAN_PATH, HOSTNAMES, HOSTS, INTERFACE,
                                   LabError, run_tool)


class LabCommands:
    """Commands that run on the lab's hosts (see the module docstring).

    The class that mixes it in provides ``name``, ``dir`` (the lab's state folder),
    ``hostfile``, ``hostfile_json``, ``tmp_dir(host)`` and ``sshd_pid(host)``.
    """

    # --- the ssh client
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

    def ssh_config_text(self) -> str:
        """The lab's ``ssh_config``: both hosts by address and name, root with the lab's
        key, only the lab's known hosts (checked strictly), never a password prompt."""
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

    def ssh_wrapper_text(self) -> str:
        """The script at :attr:`ssh`: OpenSSH's ``ssh`` with the lab's ``ssh_config``."""
        return ("#!/bin/sh\n# ssh with the two-host lab's key, known hosts and "
                "options (course_lib.lab)\n"
                f"exec /usr/bin/ssh -F {shlex.quote(str(self.ssh_config))} \"$@\"\n")

    def ssh_command(self, host: str, *cmd) -> list[str]:
        """``ssh ADDRESS cmd`` with the lab's key and settings (run it on the other host)."""
        return [str(self.ssh), ADDRESSES[host], *[str(c) for c in cmd]]

    # --- on one host
    def host_command(self, host: str, *cmd, cwd: str | Path | None = None) -> list[str]:
        """``cmd`` prefixed so that it runs on ``host``: inside the namespaces of its sshd
        (network, host name, mounts), in ``cwd`` (default: the current directory). Raises
        :class:`course_lib.lab_system.LabError` when the lab is not up."""
        pid = self.sshd_pid(host)
        if pid is None:
            raise LabError(f"lab {self.name} is not up (no sshd on host {host}): run "
                           "`python -m course_lib.lab up`")
        # Without LD_PRELOAD: a preloaded OpenBLAS starts threads when it loads, and a
        # process with threads cannot enter a mount namespace (setns: EINVAL). The course's
        # entry points preload it again themselves (course_lib.blas).
        return ["env", "-u", "LD_PRELOAD", f"TMPDIR={self.tmp_dir(host)}", "nsenter",
                f"--target={pid}", "--net", "--uts", "--mount", f"--wd={cwd or os.getcwd()}",
                "--", *[str(c) for c in cmd]]

    def env(self, **extra: str) -> dict:
        """The environment for commands on the lab's hosts: the caller's, with the lab's
        ``ssh`` first on ``PATH`` (``mlx.launch`` calls plain ``ssh``), without
        ``LD_PRELOAD`` (see :meth:`host_command`), and with ``extra``."""
        base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        path = base.get("PATH") or CLEAN_PATH
        return {**base, "PATH": f"{self.bin_dir}:{path}", **extra}

    def run(self, host: str, *cmd, timeout: float = 120, check: bool = True,
            env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``host`` and return the finished process (text output captured).
        Raises :class:`course_lib.lab_system.LabError` with its output when it exits
        non-zero and ``check``."""
        return run_tool(self.host_command(host, *cmd, cwd=cwd), timeout=timeout, check=check,
                        env=env if env is not None else self.env())

    # --- across both hosts
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

        ``slots`` ranks per host (``n`` at most ``2 * slots``, else ``ValueError``);
        ``extra`` more mpirun options. ``on_host=False`` leaves out the prefix that runs it
        on host a (to show the command, or to type it in ``python -m course_lib.lab exec a
        -- ...``).
        """
        if n > 2 * slots:
            raise ValueError(f"{n} ranks do not fit 2 hosts x {slots} slots")
        hostfile = self.hostfile
        if slots != 1:
            hostfile = self.dir / f"hostfile-{slots}"
            hostfile.write_text("".join(f"{ADDRESSES[h]} slots={slots}\n" for h in HOSTS))
        env = {"OPENBLAS_NUM_THREADS": "1"} if env is None else env
        args = launch.mpirun_command(n, hostfile=str(hostfile), interface=INTERFACE)
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
        env = {"OPENBLAS_NUM_THREADS": "1"} if env is None else env
        args = launch.mlx_launch_command(2, *cmd, hostfile=str(self.hostfile_json))
        args[1:1] = [x for k, v in env.items() for x in ("--env", f"{k}={v}")]
        return self.host_command("a", *args) if on_host else args
