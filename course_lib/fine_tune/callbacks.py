"""The services a run reports to, ``--report-to tensorboard,wandb,swanlab``, as ``mlx_lm lora
--report-to`` has them. The callbacks are ``mlx_lm.tuner.callbacks.TrainingCallback``
objects, chained the way ``mlx_lm``'s ``get_reporting_callbacks`` chains them, and they
receive the dictionaries ``mlx_lm``'s trainer sends (``train_loss``, ``learning_rate``,
``iterations_per_second``, ``tokens_per_second``, ``trained_tokens``, ``peak_memory``;
``val_loss``, ``val_time``), plus one key per rank and metric, ``"METRIC/rankR"``. wandb
and swanlab are ``mlx_lm``'s own callbacks; :class:`TensorBoardCallback` is ours
(``mlx_lm`` has none) and writes with tensorboardX.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from mlx_lm.tuner.callbacks import SwanLabCallback, TrainingCallback, WandBCallback

from course_lib.fine_tune.errors import UsageError

TENSORBOARD_FOLDER = "tensorboard"  # inside --adapter-path


def run_name(rank: int, host: str = "") -> str:
    """The TensorBoard run (folder) of a rank's series: ``rankR-HOST``, the host name with
    characters other than letters, digits, ``.``, ``_`` and ``-`` as ``_`` (``rankR``
    when the host is unknown)."""
    return f"rank{rank}" + (f"-{re.sub(r'[^A-Za-z0-9._-]', '_', host)}" if host else "")


class TensorBoardCallback(TrainingCallback):
    """TensorBoard event files in ``LOG_DIR/tensorboard``: one scalar per metric, one run
    (folder) per series: ``global`` (the run's numbers, as ``mlx_lm`` reports them) and
    ``rankR-HOST`` for each rank (its ``"METRIC/rankR"`` keys), so that TensorBoard draws
    every rank's ``train_loss``, ``step_seconds``... in one chart. The constructor takes
    ``mlx_lm``'s callback arguments (``config["hosts"]`` names the rank folders) and
    ``purge_step``: on resuming at step N+1, points from step N+1 on in earlier files are
    dropped by TensorBoard's reader (tensorboardX writes a ``SessionLog.START``).
    Points reach the files within about a second, so a dashboard shows a run while it
    trains; :meth:`close` writes the rest (a killed run may lose its last second, which a
    resumed run writes again). Raises ImportError, with the install line, when
    tensorboardX is missing."""

    def __init__(self, project_name, log_dir, config, wrapped_callback=None,
                 purge_step: int | None = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError(TENSORBOARD_MISSING) from e
        self.folder = Path(log_dir) / TENSORBOARD_FOLDER
        self.hosts = list((config or {}).get("hosts") or [])
        self.wrapped_callback = wrapped_callback
        # flush_secs=1: tensorboardX's writer thread puts each point on disk within about
        # a second (its default, 120 s, is too slow for a live dashboard).
        self._new = lambda run: SummaryWriter(str(self.folder / run), purge_step=purge_step,
                                              flush_secs=1)
        self.writers = {}

    def run_name(self, rank: int | None) -> str:
        """:func:`run_name` of ``rank`` (None: ``global``) and its host."""
        if rank is None:
            return "global"
        return run_name(rank, self.hosts[rank] if rank < len(self.hosts) else "")

    def _write(self, info: dict):
        step = info["iteration"]
        for key, value in info.items():
            if key == "iteration" or not isinstance(value, (int, float)):
                continue
            metric, _, rank = key.rpartition("/rank") if "/rank" in key else (key, "", "")
            run = self.run_name(int(rank) if rank else None)
            if run not in self.writers:
                self.writers[run] = self._new(run)
            self.writers[run].add_scalar(metric, value, step)

    def on_train_loss_report(self, train_info: dict):
        self._write(train_info)
        if self.wrapped_callback:
            self.wrapped_callback.on_train_loss_report(train_info)

    def on_val_loss_report(self, val_info: dict):
        self._write(val_info)
        if self.wrapped_callback:
            self.wrapped_callback.on_val_loss_report(val_info)

    def close(self):
        for writer in self.writers.values():
            writer.close()


TENSORBOARD_MISSING = ("tensorboardX is not installed: bash scripts/setup.sh installs it "
                       "(or pip install 'course_lib[dashboard]')")
CALLBACKS = {"tensorboard": TensorBoardCallback, "wandb": WandBCallback,
             "swanlab": SwanLabCallback}
PACKAGES = {"tensorboard": ("tensorboardX", TENSORBOARD_MISSING),
            "wandb": ("wandb", "wandb is not installed: pip install wandb"),
            "swanlab": ("swanlab", "swanlab is not installed: pip install swanlab")}


def report_to_names(report_to: str | None) -> list[str]:
    """The services in ``--report-to`` (comma separated, case and spaces ignored, as
    ``mlx_lm``'s ``get_reporting_callbacks`` reads it); [] for None or ""."""
    return [n.strip().lower() for n in (report_to or "").split(",") if n.strip()]


def check_report_to(report_to: str | None, need_packages: bool = True) -> None:
    """Raise :class:`UsageError` naming ``--report-to`` when a service is unknown or, with
    ``need_packages``, its package is not installed."""
    for name in report_to_names(report_to):
        if name not in CALLBACKS:
            raise UsageError(f"--report-to: {name!r} is not one of {', '.join(CALLBACKS)}")
        package, missing = PACKAGES[name]
        if need_packages and importlib.util.find_spec(package) is None:
            raise UsageError(f"--report-to {name}: {missing}")


def reporting_callbacks(report_to: str | None, project_name: str | None, log_dir: str,
                        config: dict, purge_step: int | None = None):
    """The chained callbacks for ``--report-to`` (None when it names none), built as
    ``mlx_lm.tuner.callbacks.get_reporting_callbacks`` builds them, with tensorboard
    added; ``purge_step`` goes to :class:`TensorBoardCallback`."""
    callback = None
    for name in report_to_names(report_to):
        check_report_to(name)
        extra = {"purge_step": purge_step} if name == "tensorboard" else {}
        callback = CALLBACKS[name](project_name=project_name, log_dir=log_dir, config=config,
                                   wrapped_callback=callback, **extra)
    return callback
