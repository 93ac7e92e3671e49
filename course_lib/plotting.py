"""Loss curves from ``metrics.jsonl`` (:func:`course_lib.metrics.read`), per-rank step
times, token lengths and sharding layouts (matplotlib; works without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from course_lib.atomic import atomic_write


def plot_loss_curves(runs: dict[str, list[dict]], out: str | Path | None = None,
                     title: str = "Loss", ax=None):
    """Train (solid) and validation (dashed, dots) loss against iteration, one colour per run.

    ``runs`` maps a label to its metric records (:func:`course_lib.metrics.read`). Saves a
    PNG to ``out`` when given, atomically (:class:`course_lib.atomic.WriteError` when it
    cannot). Returns the matplotlib ``Figure``.
    """
    import matplotlib

    if ax is None and out is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(7, 4))
    ax = ax or fig.add_subplot(1, 1, 1)
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        # None/NaN: a window that scored no token has no loss to draw.
        scored = [r for r in records if r["loss"] is not None and r["loss"] == r["loss"]]
        train = [(r["iteration"], r["loss"]) for r in scored if r["split"] == "train"]
        valid = [(r["iteration"], r["loss"]) for r in scored if r["split"] == "valid"]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{label}: train")
        if valid:
            ax.plot(*zip(*valid), color=color, linestyle="--", marker="o",
                    label=f"{label}: validation")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save(fig, out)


def save(fig, out: str | Path | None, **savefig_options):
    """Write ``fig`` to ``out`` (its format from the suffix, PNG without one) whole or not at
    all (:class:`course_lib.atomic.WriteError` on failure), and close it in pyplot; nothing
    when ``out`` is None. Returns ``fig``."""
    if out is not None:
        import matplotlib.pyplot as plt

        try:
            with atomic_write(out, "wb") as f:
                fig.savefig(f, format=Path(out).suffix.lstrip(".") or "png", dpi=100,
                            **savefig_options)
        finally:
            plt.close(fig)
    return fig


RANK_TIMES = (("forward_backward_seconds", "forward+backward"),
              ("all_reduce_wait_seconds", "at the all-reduce (waiting + exchange)"),
              ("step_seconds", "whole step"))


def plot_rank_times(records: list[dict], out: str | Path | None = None,
                    title: str = "Seconds per step, by rank"):
    """Each rank's forward+backward time, its time at the all-reduce and its step time
    (seconds per step over each report window) against iteration: one panel each, one
    colour per rank, from a run's ``"rank"`` records (:func:`course_lib.metrics.read`). The
    slow rank has the highest forward+backward line; the others wait for it at the
    all-reduce. Saves a PNG to ``out`` when given; returns the matplotlib ``Figure``.
    Raises ValueError when the records hold no per-rank phase times (a run from before
    per-rank records, or one with ``--no-rank-timing``)."""
    import matplotlib

    if out is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ranks = [r for r in records if r["split"] == "rank" and "all_reduce_wait_seconds" in r]
    if not ranks:
        raise ValueError("no per-rank phase times in these records (split 'rank' with "
                         "all_reduce_wait_seconds)")
    fig, axes = plt.subplots(1, len(RANK_TIMES), figsize=(12, 3.5), sharex=True)
    for ax, (field, label) in zip(axes, RANK_TIMES):
        for rank in sorted({r["rank"] for r in ranks}):
            mine = [r for r in ranks if r["rank"] == rank]
            ax.plot([r["iteration"] for r in mine], [r[field] for r in mine],
                    color=f"C{rank}", marker=".", label=f"rank {rank} ({mine[0]['host']})")
        ax.set_title(label)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("seconds per step")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, out)


def plot_token_lengths(lengths: list[int], cutoff: int | None = None, ax=None,
                       bins: int = 40):
    """Histogram of token counts per row, with the ``cutoff`` (rows above it are dropped)
    as a vertical line. Returns the matplotlib ``Figure``."""
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(7, 3.5))
    ax = ax or fig.add_subplot(1, 1, 1)
    ax.hist(lengths, bins=bins, color="C0")
    if cutoff is not None:
        dropped = sum(1 for n in lengths if n > cutoff)
        ax.axvline(cutoff, color="C3", linestyle="--",
                   label=f"--max-tokens {cutoff}: {dropped} of {len(lengths)} rows dropped")
        ax.legend()
    ax.set_xlabel("tokens per row (chat template applied)")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths")
    fig.tight_layout()
    return fig


# The matrices of one llama block and the embedding, in the order they are drawn.
_LAYOUT_TILES = [("embed_tokens.weight", "embedding"), ("self_attn.q_proj.weight", "q"),
                 ("self_attn.k_proj.weight", "k"), ("self_attn.v_proj.weight", "v"),
                 ("self_attn.o_proj.weight", "o"), ("mlp.gate_proj.weight", "gate"),
                 ("mlp.up_proj.weight", "up"), ("mlp.down_proj.weight", "down")]
# Okabe-Ito colours, one per rank (readable with the common colour-vision deficiencies).
_RANK_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
                 "#000000")
_WHOLE = "#BBBBBB"
_LAYOUT_HEAD = 1.05  # inches above the panels: title, subtitle, legend


def _layout_strips(rows: int, cols: int, fold: int) -> list[tuple[int, int, float]]:
    """A ``rows`` x ``cols`` matrix cut into strips of at most ``fold`` rows laid side by
    side: ``[(first_row, end_row, x)]``, x in the matrix's own columns (gap 8% of one)."""
    k = -(-rows // fold)
    size = -(-rows // k)
    return [(i * size, min(rows, (i + 1) * size), i * cols * 1.08) for i in range(k)]


def _layout_pieces(rows, cols, axis, ranks):
    """``[(rank or None, first_row, end_row, first_col, end_col)]``: the part of a
    ``rows`` x ``cols`` matrix each rank holds (None: whole on every rank)."""
    if axis is None:
        return [(None, 0, rows, 0, cols)]
    if axis == 0:
        return [(k, k * rows // ranks, (k + 1) * rows // ranks, 0, cols) for k in range(ranks)]
    return [(k, 0, rows, k * cols // ranks, (k + 1) * cols // ranks) for k in range(ranks)]


def _layout_matrices(layouts: dict[str, list[dict]]) -> list[list[tuple]]:
    """Per mode (a layout), the matrices drawn, in ``_LAYOUT_TILES``' order: ``[(name, rows,
    cols, axis)]`` from the first 2-D layout row whose path ends as the tile's does.
    Raises ValueError when no mode has any."""
    found = []
    for rows in layouts.values():
        by_suffix = {}
        for r in rows:
            for suffix, _ in _LAYOUT_TILES:
                if r["path"].endswith(suffix) and len(r["whole"]) == 2:
                    by_suffix.setdefault(suffix, r)
        found.append([(name, *by_suffix[s]["whole"], by_suffix[s]["axis"])
                      for s, name in _LAYOUT_TILES if s in by_suffix])
    if not any(found):
        raise ValueError("no embedding or block matrices in these layouts")
    return found


class _LayoutScale(NamedTuple):
    """Where the layout's matrices go and how big, in the matrices' own units (one a row or
    a column): ``placed`` per mode ``[(name, rows, cols, axis, x, strips)]`` (x of the left
    edge; strips as :func:`_layout_strips`), the panels' ``width`` (scale square included),
    the ``tallest`` matrix or strip, ``fold`` (the most rows a strip has), ``ref`` (the
    scale square's side), ``inches`` per unit, the room for ``label_h`` under the matrices
    and ``title_h`` above them (units), and a ``panel``'s height (inches)."""
    placed: list
    width: float
    tallest: int
    fold: int
    ref: int
    inches: float
    label_h: float
    title_h: float
    panel: float


def _layout_scale(found: list[list[tuple]]) -> _LayoutScale:
    """One scale for every panel: the matrices laid left to right, the embedding cut into
    strips of at most twice the block's tallest matrix, the whole at most 9.6 inches wide
    and 1.9 tall; the scale square's side 1, 2 or 5 times a power of ten, at most 3/4 of
    the block's tallest matrix's rows."""
    tiles = [t for mode in found for t in mode]
    block = [t for t in tiles if t[0] != "embedding"] or tiles
    unit = min(c for _, _, c, _ in block)  # the hidden size, for a llama
    fold = 2 * max(r for _, r, _, _ in block)
    # Where every matrix goes (x of its left edge; its strips), mode by mode.
    placed, width = [], 0.0
    for mode in found:
        x, here = 0.0, []
        for name, r, c, axis in mode:
            strips = _layout_strips(r, c, fold) if name == "embedding" else [(0, r, 0.0)]
            here.append((name, r, c, axis, x, strips))
            x += strips[-1][2] + c + (1.2 if name == "embedding" else 0.35) * unit
        placed.append(here)
        width = max(width, x)
    tallest = max(min(r, fold) for _, r, _, _ in tiles)
    ref = next(s for s in (10 ** e * m for e in range(8, -1, -1) for m in (5, 2, 1))
               if s <= max(r for _, r, _, _ in block) * 0.75)
    width += ref + 0.2 * unit
    inches = min(9.6 / width, 1.9 / tallest)  # one scale for every panel; none too tall
    label_h, title_h = 0.42 / inches, 0.3 / inches
    panel = (tallest + label_h + title_h) * inches
    return _LayoutScale(placed, width, tallest, fold, ref, inches, label_h, title_h, panel)


def _draw_layout_matrix(ax, label: str, matrix: tuple, ranks: int) -> None:
    """One matrix, strip by strip: each rank's part in its colour (grey: whole on every
    rank), then each strip's outline."""
    from matplotlib.patches import Rectangle

    name, r, c, axis, x0, strips = matrix
    for part, a, b, c0, c1 in _layout_pieces(r, c, axis, ranks):
        colour = _WHOLE if part is None else _RANK_COLOURS[part % 8]
        gid = f"{label}|{name}|" + ("whole" if part is None else f"rank {part}")
        for s0, s1, sx in strips:
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                ax.add_patch(Rectangle((x0 + sx + c0, -(hi - s0)), c1 - c0, hi - lo,
                                       facecolor=colour, lw=0, gid=gid))
    for s0, s1, sx in strips:
        ax.add_patch(Rectangle((x0 + sx, -(s1 - s0)), c, s1 - s0, fill=False,
                               edgecolor="black", lw=0.6, gid=f"{label}|{name}|outline"))


def _label_layout_matrix(ax, m: int, here: list, matrix: tuple, s: _LayoutScale) -> None:
    """A matrix's name under it; the embedding's, in the first panel, with its size (and,
    cut into strips, how many and how many times the block's matrices' parameters)."""
    name, r, c, _, x0, strips = matrix
    span = strips[-1][2] + c
    low = -min(r, s.fold) - 0.06 * s.label_h
    if name != "embedding":
        ax.text(x0 + span / 2, low, name, ha="center", va="top", fontsize=8)
    elif m == 0 and len(strips) > 1:
        others = sum(rr * cc for n, rr, cc, _, _, _ in here if n != "embedding")
        ax.text(x0, low, f"embedding {r}x{c}, cut into {len(strips)} strips of "
                f"{strips[0][1]} rows"
                + (f":\n{r * c / others:.1f}x the parameters of the block's "
                   f"{len(here) - 1} matrices together" if others else ""),
                ha="left", va="top", fontsize=7.5)
    else:
        ax.text(x0 + span / 2, low, "embedding" + (f" {r}x{c}" if m == 0 else ""),
                ha="center", va="top", fontsize=8)


def _note_layout_block(ax, here: list, s: _LayoutScale) -> None:
    """Under the block's matrices (first panel): their shapes, rows x columns, alike
    shapes named together."""
    shapes = {}
    for name, r, c, _, _, _ in here:
        if name != "embedding":
            shapes.setdefault(f"{r}x{c}", []).append(name)
    first = next((x0 for n, _, _, _, x0, _ in here if n != "embedding"), None)
    if first is not None:
        deepest = max(min(r, s.fold) for n, r, _, _, _, _ in here if n != "embedding")
        ax.text(first, -deepest - 0.55 * s.label_h, "one block (rows x columns):\n" + "; ".join(
            f"{', '.join(names)} {shape}" for shape, names in shapes.items()),
            va="top", fontsize=7.5)


def _draw_layout_scale(ax, s: _LayoutScale) -> None:
    """The scale (first panel, right): a dashed square of ``ref`` x ``ref`` parameters."""
    from matplotlib.patches import Rectangle

    sx = s.width - s.ref
    ax.add_patch(Rectangle((sx, -s.ref), s.ref, s.ref, fill=False, edgecolor="0.3",
                           ls="--", lw=0.8, gid="scale", clip_on=False))
    ax.text(s.width, -s.ref - 0.06 * s.label_h,
            f"scale: {s.ref}x{s.ref}\n= {s.ref * s.ref:,} parameters",
            ha="right", va="top", fontsize=7)


def _draw_layout_panel(fig, m: int, label: str, here: list, s: _LayoutScale,
                       ranks: int) -> None:
    """Mode ``m``'s row of the figure, in its own axes (x and y on one scale): its label,
    its matrices and their names; the first also the block's shapes and the scale."""
    height = fig.get_figheight()
    ax = fig.add_axes((0.2 / 10, (height - _LAYOUT_HEAD - (m + 1) * s.panel) / height,
                       s.width * s.inches / 10, s.panel / height))
    ax.set_xlim(0, s.width)
    ax.set_ylim(-s.tallest - s.label_h, s.title_h)
    ax.set_axis_off()
    ax.text(0, s.title_h * 0.55, label, fontsize=10, fontweight="bold", va="center")
    for matrix in here:
        _draw_layout_matrix(ax, label, matrix, ranks)
        _label_layout_matrix(ax, m, here, matrix, s)
    if m == 0:
        _note_layout_block(ax, here, s)
        _draw_layout_scale(ax, s)


def _draw_layout_header(fig, ranks: int) -> None:
    """Above the panels: the title, how splits are cut, and the ranks' colours."""
    from matplotlib.patches import Patch

    height = fig.get_figheight()
    handles = [Patch(color=_RANK_COLOURS[k % 8], label=f"rank {k}") for k in range(ranks)]
    handles.append(Patch(color=_WHOLE, label="whole on every rank"))
    fig.legend(handles=handles, loc="center left", ncol=ranks + 1, fontsize=8,
               bbox_to_anchor=(0.01, 1 - 0.8 / height), frameon=False)
    fig.text(0.02, 1 - 0.22 / height, "What each rank holds: the embedding and one block's "
             "matrices, to scale (area = parameters)", fontsize=10.5, fontweight="bold",
             va="center")
    fig.text(0.02, 1 - 0.5 / height, "split by rows (axis 0, output features): cut top to "
             "bottom; by columns (input features): left to right", fontsize=8, va="center")


def plot_sharding_layout(layouts: dict[str, list[dict]], ranks: int = 2, out=None):
    """What each rank holds, one row per mode: the embedding and the seven matrices of the
    first block (every block is split alike), coloured by the rank that holds each part
    (grey: whole on every rank). A matrix split along axis 0 (its rows: output features)
    is cut top to bottom, one split along its last axis (input features) left to right.

    Drawn to scale: every matrix is a rectangle its real rows tall and columns wide, on
    one scale for the whole figure (the square in the top row: a million parameters), so
    areas compare as parameter counts do. An embedding far taller than the block's
    matrices (SmolLM2's 49152 x 576) is drawn cut into strips of rows laid side by side,
    same scale and same area; the figure says how many times the block's seven matrices
    together it holds. The norms (vectors) are too small to draw.

    ``layouts`` maps a label to the ``layout`` rows of a run's ``summary.json``
    (``summary["sharding"]["layout"]``: ``path``, ``shape``, ``whole``, ``axis``). Each
    drawn piece is a patch whose ``gid`` is ``"LABEL|MATRIX|outline"`` (one per strip)
    or ``"LABEL|MATRIX|rank K"`` / ``"LABEL|MATRIX|whole"``. Returns the matplotlib
    ``Figure``; saves a PNG to ``out`` when given."""
    import matplotlib.pyplot as plt

    s = _layout_scale(_layout_matrices(layouts))
    fig = plt.figure(figsize=(10, _LAYOUT_HEAD + s.panel * len(layouts)))
    for m, (label, here) in enumerate(zip(layouts, s.placed)):
        _draw_layout_panel(fig, m, label, here, s, ranks)
    _draw_layout_header(fig, ranks)
    return save(fig, out)
