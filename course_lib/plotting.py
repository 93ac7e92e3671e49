"""Loss curves from ``metrics.jsonl`` (:func:`course_lib.metrics.read`), per-rank step
times, token lengths and sharding layouts (matplotlib; works without a display)."""

from __future__ import annotations

from pathlib import Path

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
    if out is not None:  # whole or not at all (course_lib.atomic): WriteError on failure
        try:
            with atomic_write(out, "wb") as f:
                fig.savefig(f, format=Path(out).suffix.lstrip(".") or "png", dpi=100)
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
    if out is not None:
        fig.savefig(out, dpi=100)
        plt.close(fig)
    return fig


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


def plot_sharding_layout(layouts: dict[str, list[dict]], ranks: int = 2, out=None):
    """What each rank holds, one row of tiles per mode: the embedding and the seven
    matrices of the first block (every block is split alike), each tile one whole matrix
    (not to scale; its shape written under it), coloured by the rank that holds each part.
    A matrix split along axis 0 (its rows: output features) is cut top to bottom, one
    split along its last axis (input features) left to right; grey: whole on every rank.

    ``layouts`` maps a label to the ``layout`` rows of a run's ``summary.json``
    (``summary["sharding"]["layout"]``: ``path``, ``shape``, ``whole``, ``axis``). Returns
    the matplotlib ``Figure``; saves a PNG to ``out`` when given."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    fig, axes = plt.subplots(len(layouts), 1, figsize=(9, 1.45 * len(layouts) + 0.5),
                             squeeze=False)
    for ax, (label, rows) in zip(axes[:, 0], layouts.items()):
        by_suffix = {}
        for r in rows:
            for suffix, _ in _LAYOUT_TILES:
                if r["path"].endswith(suffix):
                    by_suffix.setdefault(suffix, r)
        for i, (suffix, name) in enumerate(_LAYOUT_TILES):
            r = by_suffix.get(suffix)
            if r is None:
                continue
            x = i * 1.25
            axis = r["axis"]
            if axis is None:
                ax.add_patch(Rectangle((x, 0), 1, 1, color="0.75"))
            for k in range(ranks if axis is not None else 0):
                if axis == 0:  # rows: rank 0 on top
                    rect = (x, 1 - (k + 1) / ranks), 1, 1 / ranks
                else:
                    rect = (x + k / ranks, 0), 1 / ranks, 1
                ax.add_patch(Rectangle(*rect, color=f"C{k}", alpha=0.8))
            ax.add_patch(Rectangle((x, 0), 1, 1, fill=False, edgecolor="black", lw=0.8))
            ax.text(x + 0.5, -0.12, f"{name}\n{r['whole'][0]}x{r['whole'][1]}",
                    ha="center", va="top", fontsize=8)
        ax.set_xlim(-0.1, len(_LAYOUT_TILES) * 1.25)
        ax.set_ylim(-0.75, 1.05)
        ax.set_axis_off()
        ax.set_title(label, loc="left", fontsize=10)
    handles = [Patch(color=f"C{k}", alpha=0.8, label=f"rank {k}") for k in range(ranks)]
    handles.append(Patch(color="0.75", label="whole on every rank"))
    fig.legend(handles=handles, loc="upper right", ncol=ranks + 1, fontsize=8)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
        plt.close(fig)
    return fig
