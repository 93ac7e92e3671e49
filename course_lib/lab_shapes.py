"""The links the two-host lab imitates: each shape's bandwidth and latency with their
sources, and the ``tc`` queueing disciplines that make one.

The bandwidth is enforced with a token-bucket filter (``tc qdisc ... tbf``) on both ends of
the link; the latency with ``netem`` under it, only where the kernel has netem (otherwise
the cost model, :func:`course_lib.traffic.ring_all_reduce_seconds`, adds it).
:meth:`course_lib.lab.Lab.set_shape` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

from course_lib.lab_system import LabError


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


def check_shape(name: str) -> None:
    """Raise :class:`course_lib.lab_system.LabError` unless ``name`` is a key of
    :data:`SHAPES` or ``"none"`` (the bare link)."""
    if name != "none" and name not in SHAPES:
        raise LabError(f"unknown shape {name!r}; choose from {', '.join(SHAPES)} or none")


def qdisc_args(shape: Shape, interface: str) -> tuple[list[str], list[str]]:
    """The arguments of ``tc`` that shape one end of the link (``interface``) like
    ``shape``: ``(tbf, netem)``, a token-bucket filter as the root qdisc for the bandwidth
    and a netem qdisc under it for the latency."""
    rate_bytes = shape.bits_per_second / 8
    # The bucket holds 1 ms of the rate. A real link has none (every byte waits its
    # turn), and a bucket lets a burst after an idle pause through at memory speed:
    # for the default 432 KiB gradient over wifi, 50 KB of it. A smaller bucket
    # means a timer interrupt per few packets: with 100 us of the rate the timers
    # took so much of this 2-core VM's CPU that the forward pass slowed down 2x.
    burst = int(max(16384, rate_bytes * 1e-3))
    limit = int(min(max(4 * burst, rate_bytes * 0.05, 256 * 1024), 32 * 2**20))
    tbf = ["qdisc", "add", "dev", interface, "root", "handle", "1:", "tbf",
           "rate", f"{int(shape.bits_per_second)}bit", "burst", str(burst),
           "limit", str(limit)]
    netem = ["qdisc", "add", "dev", interface, "parent", "1:1", "handle",
             "10:", "netem", "delay", f"{shape.latency_seconds * 1e6:.0f}us",
             "limit", "100000"]
    return tbf, netem


def describe(name: str, netem: bool) -> str:
    """One line on the link shaped like ``name`` (or ``"none"``), whose latency is emulated
    when ``netem``."""
    if name == "none":
        return "link: unshaped veth"
    s = SHAPES[name]
    return (f"link: {name} ({s.stands_for}): {s.bits_per_second / 1e9:g} Gbit/s each way "
            f"(tbf); latency {s.latency_seconds * 1e6:g} us "
            + ("emulated (netem)" if netem else
               "NOT emulated: this kernel has no netem qdisc; the cost model adds it"))
