"""How the course's tools log in to other hosts: the OpenSSH options they share.

``python -m course_lib.doctor`` (its SSH checks) and ``python -m course_lib.workshop``
(``keys``, ``sync``, ``check``) run plain ``ssh`` (and ``rsync -e ssh``) with
:func:`ssh_options`. The two-host lab (:mod:`course_lib.lab`) writes its own ``ssh_config``
instead: it knows its hosts' keys in advance, so it checks them strictly.
"""

from __future__ import annotations


def ssh_options(timeout: float = 10) -> list[str]:
    """``-o`` options for ``ssh``: never ask for a password (fail instead), give up on a
    host that does not answer in ``timeout`` seconds (whole seconds, rounded down), and
    accept a new host's key on first contact (a changed one still fails)."""
    return ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}",
            "-o", "StrictHostKeyChecking=accept-new"]
