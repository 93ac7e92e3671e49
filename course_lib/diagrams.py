"""Pictures of the ideas the chapters explain in words, drawn with matplotlib: the ring
all-reduce step by step (:func:`ring_all_reduce`), one FSDP training step on one rank
(:func:`fsdp_timeline`) and the two-host lab (:func:`lab_topology`).

Each function returns a matplotlib ``Figure`` about 10 inches wide (a notebook's width),
draws in well under a second, gives the same picture every time, and uses the Okabe-Ito
colours (Okabe and Ito 2008, "Color Universal Design"), which readers with the common
colour-vision deficiencies tell apart. ``out``: a path to save a PNG to (written whole or
not at all, :func:`course_lib.atomic.atomic_write`); the saved figure is closed in pyplot
(no second copy in a notebook) and still returned.
"""

from __future__ import annotations

from course_lib.plotting import save


# Okabe-Ito: blue, orange, bluish green, vermillion, reddish purple, sky blue, yellow.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, YELLOW = OKABE_ITO
GREY = "#BBBBBB"
WIDTH = 10.0  # inches: a notebook's width


def _figure(height: float, width: float = WIDTH):
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height))


def _finish(fig, out):
    """Save ``fig`` as a PNG at ``out`` (when given, atomically) and close it in pyplot;
    return it. No "Software" stamp: the same drawing gives the same bytes."""
    return save(fig, out, metadata={"Software": None})


# ----------------------------------------------------------------------- the ring all-reduce

def ring_steps(ranks: int) -> list[dict]:
    """The ring all-reduce of ``ranks`` buffers, each cut into ``ranks`` chunks, step by
    step: ``[{"phase", "step", "sends", "state"}]``: the start, N-1 reduce-scatter steps,
    N-1 all-gather steps and the end. ``state[r][c]`` lists the ranks whose chunk ``c``
    rank ``r``'s buffer holds the sum of (in the order they were added); ``sends`` lists
    ``(sender, chunk, receiver)`` of that step (the buffers are after it)."""
    n = ranks
    state = [[(r,) for _ in range(n)] for r in range(n)]
    steps = [{"phase": "start", "step": 0, "sends": [], "state": state}]
    for phase in ("reduce-scatter", "all-gather"):
        for s in range(n - 1):
            # reduce-scatter: rank r sends chunk r-s and the next rank adds it to its own;
            # all-gather: rank r sends the finished chunk r+1-s and the next rank keeps it.
            first = 0 if phase == "reduce-scatter" else 1
            sends = [(r, (r + first - s) % n, (r + 1) % n) for r in range(n)]
            new = [list(row) for row in state]
            for src, c, dst in sends:
                new[dst][c] = (state[src][c] + state[dst][c] if phase == "reduce-scatter"
                               else state[src][c])
            state = [tuple(row) for row in new]
            steps.append({"phase": phase, "step": s + 1, "sends": sends, "state": state})
    steps.append({"phase": "end", "step": 0, "sends": [], "state": state})
    return steps


def _chunk_text(chunk: int, holders: tuple, n: int) -> str:
    name = "abcdefghijklmnopqrstuvwxyz"[chunk]
    if len(holders) == n:
        return f"Σ{name}"
    terms = [f"{name}{r}" for r in holders]
    # Two terms a line: a0+a1 / +a2 fits a chunk's box.
    return "\n+".join("+".join(terms[i:i + 2]) for i in range(0, len(terms), 2))


def _draw_ring_buffers(ax, st: dict, n: int, shade) -> None:
    """One step's buffers: a row of N chunks per rank, darker the more ranks each sums,
    the chunks that just changed outlined thick."""
    from matplotlib.patches import Rectangle

    changed = {(dst, c) for _, c, dst in st["sends"]}
    for r in range(n):
        for c in range(n):
            holders = st["state"][r][c]
            level = (len(holders) - 1) / (n - 1)
            face = shade(0.08 + 0.92 * level)
            bold = (r, c) in changed
            ax.add_patch(Rectangle((c + 0.04, -r - 0.4), 0.92, 0.8, facecolor=face,
                                   edgecolor="black", lw=2.2 if bold else 0.5,
                                   gid="chunk"))
            text = _chunk_text(c, holders, n)
            size = 7.5 if len(holders) in (1, n) else 6.5 if n <= 4 else 5.8
            ax.text(c + 0.5, -r, text, ha="center", va="center", fontsize=size,
                    color="white" if level > 0.45 else "black",
                    fontweight="bold" if len(holders) == n else "normal")
        ax.text(-0.1, -r, f"rank {r}", ha="right", va="center", fontsize=7.5)


def _draw_ring_sends(ax, st: dict, n: int) -> None:
    """One step's sends, right of the buffers: an arrow from each rank to the next, named
    by the chunk it carries; rank N-1's back up to rank 0 dashed, further right."""
    from matplotlib.patches import FancyArrowPatch

    x = n + 0.1
    for src, c, dst in st["sends"]:
        name = "abcdefghijklmnopqrstuvwxyz"[c]
        if dst == src + 1:  # a hop down to the next row, bulging right
            ends, rad, ls = ((x, -src - 0.08), (x, -dst + 0.08)), -0.5, "-"
            label = {"xy": (x + 0.26, -src - 0.5), "ha": "left"}
        else:  # rank N-1 back up to rank 0, further right: the ring closes
            ends, rad, ls = ((x + 0.6, -src), (x + 0.6, -dst)), 0.7 / (n - 1), "--"
            label = {"xy": (x + 0.6 + 0.35, -(n - 1) / 2), "ha": "center",
                     "bbox": {"boxstyle": "square,pad=0.05", "fc": "white", "lw": 0}}
        ax.add_patch(FancyArrowPatch(*ends, connectionstyle=f"arc3,rad={rad}",
                                     arrowstyle="-|>", mutation_scale=9, lw=1.2,
                                     color=VERMILLION, linestyle=ls, gid="send"))
        ax.annotate(name, va="center", fontsize=7, color=VERMILLION, **label)


def _title_ring_panel(ax, st: dict, n: int) -> None:
    """A step's title: start and end in black, reduce-scatter in blue, all-gather green."""
    if st["phase"] == "start":
        title = "start: each rank's own buffer"
    elif st["phase"] == "end":
        title = "end: every rank has the sum"
    else:
        verb = "add" if st["phase"] == "reduce-scatter" else "keep"
        title = f"{st['phase']} {st['step']}/{n - 1}: send 1 chunk, {verb}"
    ax.set_title(title, fontsize=8.5, color="black" if st["phase"] in ("start", "end")
                 else (BLUE if st["phase"] == "reduce-scatter" else GREEN))


def _draw_ring_panel(ax, st: dict, n: int, shade) -> None:
    """One step of the ring all-reduce in its own axes: buffers, sends, title."""
    _draw_ring_buffers(ax, st, n, shade)
    _draw_ring_sends(ax, st, n)
    ax.set_xlim(-0.75, n + 1.1)
    ax.set_ylim(-n + 0.45, 0.55)
    ax.set_axis_off()
    _title_ring_panel(ax, st, n)


def _caption_ring(fig, n: int) -> None:
    """The ring figure's title (the bytes and steps each rank sends) and its footnote."""
    fig.suptitle(f"Ring all-reduce over N = {n} ranks (Patarasuk and Yuan 2009)\n"
                 f"each rank sends 2(N-1)/N = {2 * (n - 1)}/{n} = {2 * (n - 1) / n:.3g} "
                 f"times its buffer, in 2(N-1) = {2 * (n - 1)} steps",
                 fontsize=10.5, fontweight="bold")
    fig.text(0.5, 0.005, "Each buffer is cut into N chunks. Reduce-scatter: N-1 steps, each "
             "rank sends one chunk to the next, which adds it to its own (darker = more "
             "ranks summed). All-gather: N-1 steps passing the finished chunks (Σ) on. "
             "Arrows: what each rank sends in that step.", ha="center", va="bottom",
             fontsize=7.5, wrap=True)


def ring_all_reduce(ranks: int = 4, out=None):
    """The ring all-reduce (Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms
    for clusters of workstations", JPDC 69(2), 2009; the algorithm of NCCL, MPI and MLX's
    ring backend) drawn step by step: one panel for the start, one per reduce-scatter
    step (N-1), one per all-gather step (N-1) and one for the end.

    In each panel every rank (a row) holds its buffer cut into N chunks (a, b, c, ...);
    ``a1`` is chunk a of rank 1's own buffer, ``a0+a1`` a sum of two ranks' chunk a, and
    ``Σa`` chunk a summed over all N ranks. The darker a chunk, the more ranks'
    contributions it holds. The arrows on the right are what each rank sends to the next
    one round the ring in that step (N arrows: rank N-1 sends to rank 0), and the chunks
    with a thick outline are the ones that just changed. Reduce-scatter: each rank adds
    what it receives to its own chunk; after N-1 steps each rank holds one chunk summed
    over all ranks. All-gather: the finished chunks travel round the ring and replace the
    stale ones. Each rank sends 2(N-1) chunks of 1/N of the buffer: 2(N-1)/N of the
    buffer in 2(N-1) steps, whatever N (:func:`course_lib.traffic.ring_bytes_sent`).

    ``ranks``: N, 2 to 5. ``out``: save a PNG there. Returns the matplotlib ``Figure``.
    """
    from matplotlib.colors import LinearSegmentedColormap

    n = int(ranks)
    if not 2 <= n <= 5:
        raise ValueError(f"ranks must be 2 to 5 for a readable picture, got {ranks}")
    steps = ring_steps(n)
    cols = min(n, 4)
    rows = -(-len(steps) // cols)
    fig = _figure(0.75 + rows * (0.45 + 0.42 * n))
    shade = LinearSegmentedColormap.from_list("contributions", ["#E8F1FA", BLUE, "#002F4F"])
    for i, st in enumerate(steps):
        _draw_ring_panel(fig.add_subplot(rows, cols, i + 1), st, n, shade)
    _caption_ring(fig, n)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95), w_pad=0.2, h_pad=0.6)
    return _finish(fig, out)


# ----------------------------------------------------------------------- FSDP, one step

def fsdp_events(blocks: int, recompute: bool = False) -> tuple[list[dict], list[dict]]:
    """One FSDP step on one rank: ``(events, held)``. ``events``: ``{"lane", "kind",
    "block", "start", "seconds"}`` (schematic durations: an all-gather 1, a block's
    forward 1.5, its backward 3, a reduce-scatter 1, the optimizer step 1.5; ``recompute``
    adds a forward before each backward). ``held``: what the rank holds beside its shard,
    ``{"kind": "weights" | "gradient", "block", "start", "end", "level"}``: a block's
    gathered weights from its all-gather until its compute ends, its whole gradient from
    its backward until its reduce-scatter ends; ``level`` 0 or 1 stacks them (a memory
    plot, in blocks' worth)."""
    events, held, t = [], [], 0.0

    def add(lane, kind, block, seconds):
        nonlocal t
        events.append({"lane": lane, "kind": kind, "block": block, "start": t,
                       "seconds": seconds})
        t += seconds

    for b in range(1, blocks + 1):
        start = t
        add("communication", "all-gather", b, 1.0)
        add("computation", "forward", b, 1.5)
        held.append({"kind": "weights", "block": b, "start": start, "end": t, "level": 0})
    for b in range(blocks, 0, -1):
        start = t
        add("communication", "all-gather", b, 1.0)
        if recompute:
            add("computation", "recompute", b, 1.5)
        grad = t
        add("computation", "backward", b, 3.0)
        held.append({"kind": "weights", "block": b, "start": start, "end": t, "level": 0})
        held.append({"kind": "gradient", "block": b, "start": grad, "end": t, "level": 1})
        freed = t  # the gathered weights are freed; the whole gradient waits
        add("communication", "reduce-scatter", b, 1.0)
        held.append({"kind": "gradient", "block": b, "start": freed, "end": t, "level": 0})
    add("computation", "optimizer", None, 1.5)
    return events, held


_FSDP_COLOURS = {"all-gather": BLUE, "reduce-scatter": VERMILLION, "forward": GREEN,
                 "backward": ORANGE, "recompute": SKY, "optimizer": PURPLE}
_FSDP_LABELS = {"all-gather": "all-gather a block's weights (from every rank's 1/N)",
                "reduce-scatter": "reduce-scatter its gradient (keep the sum of my 1/N)",
                "forward": "forward of a block", "backward": "backward of a block",
                "recompute": "recompute its forward (activation checkpointing)",
                "optimizer": "Adam step on my 1/N shard"}
_FSDP_LANES = {"communication": 1.0, "computation": 0.0}  # lane: its y


def _draw_fsdp_events(ax, events: list[dict]) -> None:
    """Each event a box in its lane, as long as it lasts, named by its block ("Adam": the
    optimizer step); a recompute hatched."""
    from matplotlib.patches import Rectangle

    for e in events:
        y = _FSDP_LANES[e["lane"]]
        ax.add_patch(Rectangle((e["start"], y - 0.3), e["seconds"], 0.6,
                               facecolor=_FSDP_COLOURS[e["kind"]], edgecolor="white", lw=1,
                               gid=e["kind"], hatch="//" if e["kind"] == "recompute" else None))
        text = "Adam" if e["kind"] == "optimizer" else str(e["block"])
        ax.text(e["start"] + e["seconds"] / 2, y, text, ha="center", va="center",
                fontsize=7 if e["kind"] == "optimizer" else 8, fontweight="bold",
                color="black" if e["kind"] == "recompute" else "white")


def _draw_fsdp_phases(ax, events: list[dict], blocks: int, end: float) -> None:
    """Brackets above the lanes for the forward pass, the backward pass and the optimizer
    step, with a dotted line where each ends."""
    # The backward pass starts with the last block's second all-gather.
    forward_end = next(e["start"] for e in events if e["kind"] in ("backward", "recompute"))
    forward_end -= 1.0
    backward_end = events[-1]["start"]
    for x0, x1, label in ((0, forward_end, f"forward pass: block 1 → {blocks}"),
                          (forward_end, backward_end, f"backward pass: block {blocks} → 1"),
                          (backward_end, end, "optimizer")):
        ax.annotate("", (x0 + 0.05, 1.55), (x1 - 0.05, 1.55),
                    arrowprops={"arrowstyle": "|-|", "lw": 0.8, "shrinkA": 0, "shrinkB": 0})
        ax.text((x0 + x1) / 2, 1.65, label, ha="center", va="bottom", fontsize=9)
        ax.axvline(x1, color="0.6", lw=0.6, ls=":")


def _style_fsdp_lanes(ax) -> None:
    """The lanes' axes: named lanes on y, no x ticks (the memory plot below has the time)."""
    ax.set_yticks(list(_FSDP_LANES.values()), list(_FSDP_LANES))
    ax.set_ylim(-0.55, 2.05)
    ax.tick_params(axis="x", labelbottom=False, length=0)
    ax.tick_params(axis="y", length=0)
    for s in ("top", "right", "bottom"):
        ax.spines[s].set_visible(False)


def _legend_fsdp_events(fig, recompute: bool) -> None:
    """The figure's legend at the bottom: one entry per kind of event drawn."""
    from matplotlib.patches import Patch

    kinds = [k for k in _FSDP_COLOURS if recompute or k != "recompute"]
    fig.legend(handles=[Patch(facecolor=_FSDP_COLOURS[k], hatch="//" if k == "recompute"
                              else None, label=_FSDP_LABELS[k]) for k in kinds],
               loc="lower center", ncol=3, fontsize=7.5, frameon=False)


def _draw_fsdp_memory(mem, held: list[dict], end: float) -> None:
    """Memory: the shard (a band) and, stacked on it, what is gathered, block by block;
    its legend and axes."""
    from matplotlib.patches import Patch, Rectangle

    shard = 1.2
    mem.add_patch(Rectangle((0, 0), end, shard, facecolor=GREY, lw=0, gid="shard"))
    mem.text(0.3, shard / 2, "always: this rank's shard, 1/N of every block's weights, "
             "gradients and Adam moments", va="center", fontsize=7.5)
    for h in held:
        colour = BLUE if h["kind"] == "weights" else VERMILLION
        mem.add_patch(Rectangle((h["start"], shard + h["level"]), h["end"] - h["start"], 1,
                                facecolor=colour, alpha=0.6, edgecolor="white", lw=1.5,
                                gid=h["kind"]))
        if h["end"] - h["start"] >= 2:
            mem.text((h["start"] + h["end"]) / 2, shard + h["level"] + 0.5,
                     f"{'weights' if h['kind'] == 'weights' else 'grad.'} {h['block']}",
                     ha="center", va="center", fontsize=6.5)
    mem.legend(handles=[Patch(facecolor=BLUE, alpha=0.6, label="one block's whole weights "
                              "(gathered; freed after its compute)"),
                        Patch(facecolor=VERMILLION, alpha=0.6, label="its whole gradient "
                              "(freed after the reduce-scatter)")],
               loc="upper left", fontsize=7, frameon=False, ncol=2,
               bbox_to_anchor=(0.0, 1.12))
    mem.set_ylim(0, shard + 2.7)
    mem.set_yticks([])
    mem.set_ylabel("memory held\n(not to scale)", fontsize=8)
    mem.set_xlim(-0.2, end + 0.9)
    mem.set_xticks([])
    mem.set_xlabel("time in one training step (schematic) →", fontsize=8)
    for s in ("top", "right"):
        mem.spines[s].set_visible(False)


def _caption_fsdp(fig, blocks: int, recompute: bool) -> None:
    """The FSDP figure's title (its collectives) and the line under it (recompute or not)."""
    note = ("The backward pass gathers each block again (its weights were freed) but does "
            "not recompute the forward: the forward's activations were kept."
            if not recompute else
            "Here each block's backward first recomputes its forward (activation "
            "checkpointing), as course_lib's --sharding fsdp does.")
    fig.suptitle(f"One FSDP (ZeRO-3) training step on one rank, {blocks} blocks: "
                 f"{2 * blocks} all-gathers, {blocks} reduce-scatters", fontsize=10.5,
                 fontweight="bold", y=0.99)
    fig.text(0.5, 0.925, note, ha="center", fontsize=8)


def fsdp_timeline(blocks: int = 4, out=None, *, recompute: bool = False):
    """One training step of FSDP (fully sharded data parallelism: ZeRO stage 3,
    Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models"; PyTorch FSDP, Zhao et al. 2023) on one rank of N, as a timeline.

    Two lanes, communication and computation, and below them the memory the rank holds.
    Forward pass, block 1 to ``blocks``: all-gather the block's whole weights from the
    ranks' pieces, run its forward, free the gathered copy. Backward pass, the blocks in
    reverse: all-gather the weights again (they were freed), compute the block's
    gradients from the activations the forward kept, free the weights, reduce-scatter the
    whole gradient (each rank keeps the sum over ranks of its own 1/N) and free it. Then
    the optimizer updates only this rank's 1/N shard. Memory: the shard (1/N of every
    block's weights, gradients and Adam moments) always; on top of it one block's whole
    weights at a time, and in the backward pass that block's whole gradient until its
    reduce-scatter. Activations are not drawn.

    The backward pass gathers again but does not redo the forward: that is a separate,
    optional choice, activation checkpointing (Chen et al. 2016, "Training Deep Nets
    with Sublinear Memory Cost"), which trades a second forward for the activations'
    memory. ``recompute=True`` draws it: a forward before each block's backward. The
    course's ``--sharding fsdp`` does recompute (each unit runs under ``mx.checkpoint``,
    see :mod:`course_lib.fine_tune.sharding` for why). The durations are schematic, and
    the phases run one after another; real FSDP also prefetches the next block's
    all-gather while the current block computes (chapter 7 hides communication that
    way).

    ``blocks``: transformer blocks, 1 to 12. ``out``: save a PNG there. Returns the
    matplotlib ``Figure``.
    """
    blocks = int(blocks)
    if not 1 <= blocks <= 12:
        raise ValueError(f"blocks must be 1 to 12 for a readable picture, got {blocks}")
    events, held = fsdp_events(blocks, recompute)
    end = events[-1]["start"] + events[-1]["seconds"]
    fig = _figure(5.0)
    grid = fig.add_gridspec(2, 1, height_ratios=[2.1, 1.4], hspace=0.12)
    ax = fig.add_subplot(grid[0])
    mem = fig.add_subplot(grid[1], sharex=ax)
    _draw_fsdp_events(ax, events)
    _draw_fsdp_phases(ax, events, blocks, end)
    _style_fsdp_lanes(ax)
    _legend_fsdp_events(fig, recompute)
    _draw_fsdp_memory(mem, held, end)
    _caption_fsdp(fig, blocks, recompute)
    fig.subplots_adjust(left=0.125, right=0.99, top=0.86, bottom=0.16)
    return _finish(fig, out)


# ----------------------------------------------------------------------- the two-host lab

def rate_text(bits_per_second: float) -> str:
    """``400 Mbit/s``, ``1 Gbit/s``, ``40 Gbit/s``."""
    if bits_per_second >= 1e9:
        return f"{bits_per_second / 1e9:g} Gbit/s"
    return f"{bits_per_second / 1e6:g} Mbit/s"


def latency_text(seconds: float) -> str:
    """``1.5 ms``, ``50 µs``."""
    return f"{seconds * 1e3:g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:g} µs"


def _lab_names():
    """What the lab picture names, from the lab's own modules (imported when a lab is
    drawn): ``.default_name`` (its namespaces' prefix), ``.shapes``, ``.check_shape``,
    ``.addresses``, ``.hostnames``, ``.interface``, ``.prefix_length``."""
    from types import SimpleNamespace

    from course_lib.lab import DEFAULT_NAME
    from course_lib.lab_shapes import SHAPES, check_shape
    from course_lib.lab_system import ADDRESSES, HOSTNAMES, INTERFACE, PREFIX_LENGTH

    return SimpleNamespace(default_name=DEFAULT_NAME, shapes=SHAPES, check_shape=check_shape,
                           addresses=ADDRESSES, hostnames=HOSTNAMES, interface=INTERFACE,
                           prefix_length=PREFIX_LENGTH)


# Where the lab's parts go, in data units of a 10 x 6.6 canvas.
_LAB_HOSTS = {"a": 0.35, "b": 6.45}  # host: x of its box's left edge
_LAB_RANK_Y = 1.95  # the bottom of the ranks' boxes
_LAB_CABLE_Y = 3.1  # the veth cable
_LAB_XB = _LAB_HOSTS["b"] + 1.3  # the middle of host b's column: prted over rank 1


def _box(ax, x, y, w, h, face, edge="black", lw=1.0,
         style="round,pad=0.02,rounding_size=0.08"):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=face,
                                edgecolor=edge, lw=lw))


def _arrow(ax, a, b, colour="black", style="-|>", ls="-", rad=0.0, lw=1.2):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=11, lw=lw,
                                 color=colour, linestyle=ls,
                                 connectionstyle=f"arc3,rad={rad}"))


def _say(ax, x, y, text, size=8, **kw):
    ax.text(x, y, text, fontsize=size, va=kw.pop("va", "center"), **kw)


def _draw_lab_machine(ax, link: str, shape, lab) -> None:
    """The title, the Linux machine's box and the two hosts' boxes in it (namespace, sshd)."""
    joined = "an unshaped link" if shape is None else f"a link shaped like {link}"
    _say(ax, 5, 6.42, f"The two-host lab: two hosts on one Linux machine, joined by {joined}",
         11, ha="center", fontweight="bold")
    _box(ax, 0.1, 1.55, 9.8, 4.6, "#F7F7F7", edge="0.4", lw=1.2)
    _say(ax, 0.25, 5.92, "one Linux machine, as root:  python -m course_lib.lab up --shape "
         f"{link}", 8.5, family="monospace")
    for h, x0 in _LAB_HOSTS.items():
        _box(ax, x0, 1.8, 3.2, 3.9, "#FFFFFF", edge=BLUE if h == "a" else ORANGE, lw=1.8)
        _say(ax, x0 + 0.12, 5.45, f"host {h}: {lab.hostnames[h]}", 10.5, fontweight="bold")
        _say(ax, x0 + 0.12, 5.15, f"network namespace {lab.default_name}-{h}", 7.5,
             family="monospace")
        _box(ax, x0 + 0.12, 4.3, 2.2, 0.5, SKY + "55")
        _say(ax, x0 + 1.22, 4.55, f"sshd on {lab.addresses[h]}:22", 8.5, ha="center")


def _draw_lab_host_a(ax, lab) -> None:
    """Host a: mpirun (its command line and hostfile), which starts rank 0 here."""
    rank_y = _LAB_RANK_Y
    _box(ax, 0.47, 3.05, 2.6, 0.95, YELLOW + "66")
    _say(ax, 0.55, 3.8, "mpirun -np 2 --hostfile hostfile", 7.5, family="monospace")
    _say(ax, 0.55, 3.55, f"  --mca btl_tcp_if_include {lab.interface}", 7.5,
         family="monospace")
    _say(ax, 0.55, 3.25, f"hostfile: {lab.addresses['a']} slots=1\n"
         f"          {lab.addresses['b']} slots=1", 6.5, family="monospace")
    _box(ax, 0.47, rank_y, 1.6, 0.7, GREEN + "44")
    _say(ax, 1.27, rank_y + 0.35, "rank 0", 10, ha="center", fontweight="bold")
    _arrow(ax, (1.27, 3.05), (1.27, rank_y + 0.72))
    _say(ax, 1.34, 2.85, "starts", 7)


def _draw_lab_host_b(ax) -> None:
    """Host b: its sshd starts prted, which starts rank 1."""
    xb, rank_y = _LAB_XB, _LAB_RANK_Y
    _box(ax, xb - 0.8, 3.1, 1.6, 0.65, PURPLE + "44")
    _say(ax, xb, 3.42, "prted\n(Open MPI's daemon)", 7.5, ha="center")
    _box(ax, xb - 0.8, rank_y, 1.6, 0.7, GREEN + "44")
    _say(ax, xb, rank_y + 0.35, "rank 1", 10, ha="center", fontweight="bold")
    for y0, y1 in ((4.3, 3.77), (3.1, rank_y + 0.72)):
        _arrow(ax, (xb, y0), (xb, y1))
        _say(ax, xb + 0.07, (y0 + y1) / 2, "starts", 7)


def _draw_lab_link(ax, link: str, shape, lab) -> None:
    """The link: lab0 at both ends, on the hosts' edges, the veth cable between, its tc
    qdiscs, and above it the shape's name, rate and latency."""
    cable_y = _LAB_CABLE_Y
    ends = {"a": _LAB_HOSTS["a"] + 3.2, "b": _LAB_HOSTS["b"]}
    for h, x in ends.items():
        _box(ax, x - 0.4, cable_y - 0.35, 0.8, 0.7, "#DDDDDD", style="square,pad=0")
        _say(ax, x, cable_y, f"{lab.interface}\n{lab.addresses[h]}/{lab.prefix_length}", 7,
             ha="center", family="monospace")
    x0, x1 = ends["a"] + 0.4, ends["b"] - 0.4
    ax.plot([x0, x1], [cable_y, cable_y], color="black", lw=5, solid_capstyle="butt")
    ax.plot([x0, x1], [cable_y, cable_y], color=YELLOW, lw=2.2)
    _say(ax, 5, cable_y + 0.1, "veth pair", 8.5, ha="center", va="bottom", fontweight="bold")
    _say(ax, 5, cable_y - 0.12, "(a virtual cable)", 7.5, ha="center", va="top")
    tc = (f"tc on both ends: tbf {rate_text(shape.bits_per_second)}\n+ netem delay "
          f"{latency_text(shape.latency_seconds)}" if shape else "no tc qdisc on either end")
    _say(ax, 5, cable_y - 0.42, tc, 7, ha="center", va="top", color=VERMILLION)
    shaped = ("unshaped: the bare veth, at memory speed" if shape is None else
              f"{rate_text(shape.bits_per_second)} each way, "
              f"{latency_text(shape.latency_seconds)} one way")
    _say(ax, 5, 5.3, f"link: {link}", 10, ha="center", fontweight="bold", color=VERMILLION)
    _say(ax, 5, 5.03, shaped, 8, ha="center", color=VERMILLION)


def _draw_lab_traffic(ax, lab) -> None:
    """ssh from mpirun to host b's sshd; the ranks' MPI messages; what the hosts share."""
    rank_y = _LAB_RANK_Y
    _arrow(ax, (3.07, 3.85), (_LAB_HOSTS["b"] + 0.12, 4.5), colour=BLUE, ls="--", rad=-0.12)
    _say(ax, 5, 3.95, f"ssh {lab.addresses['b']} (key login):\nstart prted on host b", 7.5,
         ha="center", va="top", color=BLUE)
    _arrow(ax, (2.07, rank_y + 0.35), (_LAB_XB - 0.8, rank_y + 0.35), colour=GREEN,
           style="<|-|>", lw=1.6)
    _say(ax, 5, rank_y + 0.25, f"MPI messages (the all-reduce) over TCP on {lab.interface}",
         7.5, ha="center", va="top", color=GREEN)
    _say(ax, 0.25, 1.67, "Each host has its own network stack, host name and TMPDIR; both "
         "share the file system (the same .venv and repository path). All traffic between "
         f"them crosses {lab.interface}.", 7)


def _draw_lab_shape_table(ax, link: str, lab) -> None:
    """The shapes the lab knows (course_lib.lab_shapes), slowest first, ``link`` marked."""
    _say(ax, 0.15, 1.3, "Link shapes (course_lib.lab_shapes.SHAPES):", 8.5, fontweight="bold")
    _say(ax, 3.4, 1.3, "rate: tc tbf on both ends; latency: tc netem, where the kernel has "
         "it (else the cost model adds it)", 7)
    rows = [("--shape", "rate each way", "latency", "stands for")]
    for name in sorted(lab.shapes, key=lambda k: lab.shapes[k].bits_per_second):
        s = lab.shapes[name]
        rows.append((name, rate_text(s.bits_per_second), latency_text(s.latency_seconds),
                     s.stands_for))
    rows.append(("none", "unshaped", "", "the bare veth"))
    for i, (name, rate, latency, stands) in enumerate(rows):
        chosen = name == link
        _say(ax, 0.3, 1.03 - 0.21 * i, ("▶ " if chosen else "  ")
             + f"{name:12} {rate:>13}  {latency:>7}   {stands}", 7.8, family="monospace",
             fontweight="bold" if chosen or i == 0 else "normal",
             color=VERMILLION if chosen else "black")


def lab_topology(link: str = "wifi", out=None):
    """The course's two-host lab (:mod:`course_lib.lab`) with its link shaped like ``link``.

    One Linux machine (root) holds two network namespaces, ``course-lab-a`` and
    ``course-lab-b``: two hosts, each with its own network stack, host name (``lab-a``,
    ``lab-b``) and temporary folder, sharing the file system (the same ``.venv`` and
    repository path on both, as a real cluster needs). A veth pair joins them, ``lab0``
    at both ends, 10.77.0.1/24 and 10.77.0.2/24, with no route anywhere else. Each host
    runs OpenSSH's sshd on its lab address. ``python -m course_lib.lab mpirun -- ...``
    runs ``mpirun`` on host a: it starts rank 0 there and, over ssh (key login, the lab's
    ``ssh`` as ``plm_rsh_agent``), Open MPI's daemon ``prted`` on host b, which starts
    rank 1; the ranks talk over ``lab0`` (``btl_tcp_if_include lab0``). Both ends of the
    link are shaped with ``tc``: a token-bucket filter (tbf) for the bandwidth and netem
    under it for the latency, where the kernel has netem. The shapes, their numbers and
    sources are :data:`course_lib.lab_shapes.SHAPES`, drawn from that table; ``"none"``
    is the bare veth.

    ``link``: a key of :data:`course_lib.lab_shapes.SHAPES` or ``"none"``. ``out``: save
    a PNG there. Returns the matplotlib ``Figure``; raises
    :class:`course_lib.lab_system.LabError` for an unknown shape.
    """
    lab = _lab_names()
    lab.check_shape(link)
    shape = lab.shapes.get(link)
    fig = _figure(6.6)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 6.6)
    ax.set_axis_off()
    _draw_lab_machine(ax, link, shape, lab)
    _draw_lab_host_a(ax, lab)
    _draw_lab_host_b(ax)
    _draw_lab_link(ax, link, shape, lab)
    _draw_lab_traffic(ax, lab)
    _draw_lab_shape_table(ax, link, lab)
    return _finish(fig, out)
