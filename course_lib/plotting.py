"""Loss curves from ``metrics.jsonl`` (matplotlib; works without a display)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a file, or the adapter folder holding one).

    Each record has ``iteration``, ``split`` (``"train"`` or ``"valid"``), ``loss`` (mean
    cross-entropy per target token, nats) and ``world_size``; train records also have
    ``tokens_per_second``, ``seconds`` and ``peak_memory_gb``.
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
