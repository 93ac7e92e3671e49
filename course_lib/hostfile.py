"""Hostfiles: which machines the ranks run on.

Two forms:

- **OpenMPI** (``mpirun --hostfile``): one machine per line, ``HOST [slots=N]
  [max_slots=M]``; ``#`` starts a comment. ``slots`` is how many ranks mpirun may start
  there (default 1 here; OpenMPI's own default is the number of cores).
- **mlx.launch** (``mlx.launch --hostfile``, JSON): a list of ``{"ssh": HOST, "ips":
  [ADDRESS, ...]}``, one entry per *rank*, or ``{"backend": ..., "envs": [...], "hosts":
  [...]}``. The ring backend needs IP addresses in ``ips``.

:func:`read_hostfile` reads either (by content) and validates it; errors name the file
and line. :func:`to_openmpi` and :func:`to_mlx_json` convert between them.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-_]*[A-Za-z0-9])?$")


class HostfileError(ValueError):
    """A hostfile that cannot be used; the message names the file (and line)."""


@dataclass
class Host:
    """One machine: its name or address, the ranks it takes, the addresses for the ring."""

    name: str
    slots: int = 1
    ips: list[str] = field(default_factory=list)
    line: int | None = None


def _valid_host(name: str) -> bool:
    return _is_ip(name) or (bool(_HOSTNAME.match(name)) and len(name) <= 253)


def parse_openmpi(text: str, source: str = "<hostfile>") -> list[Host]:
    """Hosts of an OpenMPI hostfile's ``text``.

    Raises :class:`HostfileError` (``source:line: reason``) for a bad host name, a
    ``slots``/``max_slots`` that is not a whole number >= 1, ``slots`` above ``max_slots``,
    an unknown ``key=value``, a host listed twice, or no host at all.
    """
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *options = line.split()
        where = f"{source}:{lineno}"
        if not _valid_host(name):
            raise HostfileError(f"{where}: {name!r} is not a host name or address")
        if name in seen:
            raise HostfileError(f"{where}: host {name} is listed twice (first on line "
                                f"{seen[name]}); give one line with slots=N instead")
        values = {}
        for option in options:
            key, eq, value = option.partition("=")
            if not eq or key not in ("slots", "max_slots", "max-slots"):
                raise HostfileError(f"{where}: unknown option {option!r} "
                                    "(expected slots=N or max_slots=N)")
            if not value.isdigit() or int(value) < 1:
                raise HostfileError(f"{where}: {key}={value!r} must be a whole number >= 1")
            values[key.replace("-", "_")] = int(value)
        slots = values.get("slots", 1)
        if "max_slots" in values and slots > values["max_slots"]:
            raise HostfileError(f"{where}: slots={slots} exceeds max_slots={values['max_slots']}")
        seen[name] = lineno
        hosts.append(Host(name, slots, [name] if _is_ip(name) else [], lineno))
    if not hosts:
        raise HostfileError(f"{source}: no hosts (only blank lines and comments)")
    return hosts


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def parse_mlx_json(text: str, source: str = "<hostfile>") -> list[Host]:
    """Hosts of an ``mlx.launch`` JSON hostfile (one entry per rank; repeated ``ssh``
    entries become one host with more slots, in order of first appearance).

    Raises :class:`HostfileError` for invalid JSON (with its line), a wrong structure, a
    missing or bad ``ssh``, or an ``ips`` entry that is not an IP address.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HostfileError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from e
    entries = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise HostfileError(f"{source}: expected a non-empty list of hosts "
                            '(or {"hosts": [...]})')
    hosts: dict[str, Host] = {}
    for i, entry in enumerate(entries):
        where = f"{source}: hosts[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
            raise HostfileError(f'{where}: expected {{"ssh": HOST, "ips": [...]}}')
        name = entry["ssh"]
        if not _valid_host(name):
            raise HostfileError(f"{where}: {name!r} is not a host name or address")
        ips = entry.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(a, str) and _is_ip(a) for a in ips):
            raise HostfileError(f"{where}: 'ips' must be a list of IP addresses, got {ips!r}")
        if name in hosts:
            hosts[name].slots += 1
        else:
            hosts[name] = Host(name, 1, list(ips))
    return list(hosts.values())


def read_hostfile(path: str | Path) -> list[Host]:
    """Hosts of the hostfile at ``path``, in either form (JSON if it starts with ``[`` or
    ``{``). Raises :class:`HostfileError` for a missing, empty or invalid file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HostfileError(f"{path}: no such hostfile") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(f"{path}: cannot read it ({e})") from e
    if not text.strip():
        raise HostfileError(f"{path}: the hostfile is empty")
    if text.lstrip()[0] in "[{":
        return parse_mlx_json(text, str(path))
    return parse_openmpi(text, str(path))


def total_slots(hosts: list[Host]) -> int:
    """Ranks the hosts can take in all."""
    return sum(h.slots for h in hosts)


def to_openmpi(hosts: list[Host]) -> str:
    """The OpenMPI form: ``HOST slots=N`` lines."""
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


def to_mlx_json(hosts: list[Host]) -> str:
    """The ``mlx.launch`` form: one entry per rank. Raises :class:`HostfileError` when a
    host has no IP address (the ring backend connects by address, not name)."""
    missing = [h.name for h in hosts if not h.ips]
    if missing:
        raise HostfileError(f"no IP address for {', '.join(missing)}: the ring backend "
                            "needs addresses (write the hosts as addresses)")
    entries = [{"ssh": h.name, "ips": h.ips} for h in hosts for _ in range(h.slots)]
    return json.dumps(entries, indent=2) + "\n"
