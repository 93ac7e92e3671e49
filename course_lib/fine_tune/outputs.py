"""Everything a fine-tune writes into ``--adapter-path`` (rank 0 only): the adapter and its
config, checkpoints, ``metrics.jsonl``, ``summary.json`` and ``loss.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx.utils import tree_flatten

from course_lib import checkpoint

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


class Outputs:
    """Everything the run writes. On ranks other than 0 every method does nothing."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled = Path(folder), enabled
        self._metrics = None

    def start(self, config: dict, resume_from: int | None = None) -> list[dict]:
        """Create the folder, write ``adapter_config.json`` and open ``metrics.jsonl``.

        When resuming from iteration ``resume_from``, keep the metric records up to it (the
        steps after it will run again) and return them; otherwise start the file afresh.
        """
        if not self.enabled:
            return []
        self.folder.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json_atomic(self.folder / CONFIG_FILE, config)
        kept: list[dict] = []
        metrics = self.folder / METRICS_FILE
        if resume_from is not None and metrics.exists():
            from course_lib.plotting import read_metrics

            kept = [r for r in read_metrics(metrics) if r["iteration"] <= resume_from]
            tmp = metrics.with_name(f".{METRICS_FILE}.tmp{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, metrics)
        self._metrics = open(metrics, "a" if resume_from is not None else "w")
        return kept

    def metric(self, record: dict) -> None:
        if self._metrics:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def adapters(self, model) -> None:
        """Save the trainable weights as ``adapters.safetensors``."""
        if self.enabled:
            weights = dict(tree_flatten(model.trainable_parameters()))
            checkpoint.save_safetensors_atomic(self.folder / ADAPTER_FILE, weights)

    def checkpoint(self, iteration: int, model, optimizer, state: dict) -> Path | None:
        """Write the checkpoint at ``iteration`` (see :mod:`course_lib.checkpoint`) and
        update ``adapters.safetensors``; returns the checkpoint's adapter file."""
        if not self.enabled:
            return None
        saved = checkpoint.save(self.folder, iteration, model, optimizer, state)
        self.adapters(model)
        return saved

    def finish(self, summary: dict, history: list[dict]) -> None:
        if not self.enabled:
            return
        if self._metrics:
            self._metrics.close()
        checkpoint.write_json_atomic(self.folder / SUMMARY_FILE, summary)
        from course_lib.plotting import plot_loss_curves

        n = summary["world_size"]
        label = f"{n} rank{'s' if n > 1 else ''}"
        plot_loss_curves({label: history}, self.folder / PLOT_FILE,
                         title=f"Fine-tune, {label}, global batch {summary['global_batch']}")
