"""Loss curves from ``metrics.jsonl`` (matplotlib; works without a display)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a file, or the adapter folder holding one).

    Each record has ``iteration``, ``split`` (``"train"``, ``"valid"`` or ``"rank"``),
    ``loss`` (mean cross-entropy per target token, nats) and ``world_size``; train records
    also have ``tokens_per_second``, ``seconds`` and ``peak_memory_gb``; ``rank`` records
    (one per rank and report) a rank's own numbers: ``rank``, ``host``, ``tokens``,
    ``step_seconds``... (:meth:`course_lib.fine_tune.reporting.Reporter.gather`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics_so_far(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` a run may still be writing: ``[]`` while the file
    does not exist yet, and a last line still being written is left out. Same records as
    :func:`read_metrics` otherwise."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip().endswith("}")]


def plot_loss_curves(runs: dict[str, list[dict]], out: str | Path | None = None,
                     title: str = "Loss", ax=None):
    """Train (solid) and validation (dashed, dots) loss against iteration, one colour per run.

    ``runs`` maps a label to its metric records (see :func:`read_metrics`). Saves a PNG to
    ``out`` when given, atomically (:class:`course_lib.atomic.WriteError` when it cannot).
    Returns the matplotlib ``Figure``.
    """
    import matplotlib

    if ax is None and out is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(7, 4))
    ax = ax or fig.add_subplot(1, 1, 1)
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["iteration"], r["loss"]) for r in records if r["split"] == "train"]
        valid = [(r["iteration"], r["loss"]) for r in records if r["split"] == "valid"]
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
        from course_lib.atomic import atomic_write

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
    colour per rank, from a run's ``"rank"`` records (:func:`read_metrics`). The slow rank
    has the highest forward+backward line; the others wait for it at the all-reduce.
    Saves a PNG to ``out`` when given; returns the matplotlib ``Figure``. Raises
    ValueError when the records hold no per-rank phase times (a run from before per-rank
    records, or one with ``--no-rank-timing``)."""
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
