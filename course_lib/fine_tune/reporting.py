"""Every rank's progress on rank 0, and the services a run reports to.

At each report rank 0 gathers a small vector from every rank in one
``mx.distributed.all_gather`` (host names are gathered once, at the start, as fixed-size
byte arrays, so a report moves only numbers): the rank's step time, its forward+backward
time, its time at the all-reduce, its tokens, its summed token loss and its peak memory.
They become one ``metrics.jsonl`` record per rank (``split: "rank"``, see
:meth:`Reporter.gather`) and one series per rank on the dashboard.

``--report-to tensorboard,wandb,swanlab`` follows ``mlx_lm lora --report-to``: the
callbacks are ``mlx_lm.tuner.callbacks.TrainingCallback`` objects, chained the way
``mlx_lm``'s ``get_reporting_callbacks`` chains them, and they receive the dictionaries
``mlx_lm``'s trainer sends (``train_loss``, ``learning_rate``, ``iterations_per_second``,
``tokens_per_second``, ``trained_tokens``, ``peak_memory``; ``val_loss``, ``val_time``),
plus one key per rank and metric, ``"METRIC/rankR"``. wandb and swanlab are ``mlx_lm``'s
own callbacks; :class:`TensorBoardCallback` is ours (``mlx_lm`` has none) and writes with
tensorboardX.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.tuner.callbacks import SwanLabCallback, TrainingCallback, WandBCallback

from course_lib.fine_tune.options import UsageError

HOST_BYTES = 256  # a host name is at most 253 characters (RFC 1035)
TENSORBOARD_FOLDER = "tensorboard"  # inside --adapter-path
# What each rank sends at a report, in this order (float32).
GATHERED = ("seconds", "forward_backward_seconds", "all_reduce_wait_seconds", "tokens",
            "loss_sum", "peak_memory_gb")
# The per-rank metrics that callbacks receive, as "METRIC/rankR" keys.
RANK_METRICS = ("train_loss", "step_seconds", "forward_backward_seconds",
                "all_reduce_wait_seconds", "tokens", "peak_memory")


def gather_hosts(group) -> list[str]:
    """Every rank's host name (``socket.gethostname()``), in rank order, on every rank.

    One ``all_gather`` of a ``uint8`` array of :data:`HOST_BYTES` bytes per rank (the name
    in UTF-8, zero-padded, cut at 256 bytes): strings cannot be all-gathered, fixed-size
    byte arrays can."""
    name = socket.gethostname().encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0")
    mine = mx.array(list(name), dtype=mx.uint8)
    every = mine if group.size() == 1 else mx.distributed.all_gather(mine, group=group)
    rows = every.reshape(group.size(), HOST_BYTES).tolist()
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows]


class Reporter:
    """Per-rank numbers to rank 0 at each report, and the ``--report-to`` callbacks.

    Every rank builds one (host names are gathered here, a collective call) and calls
    :meth:`gather` at every report; only rank 0 gets records back and calls the callbacks.
    ``start`` is the iteration a resumed run continues from (0 for a fresh one).
    """

    def __init__(self, group, args, start: int = 0):
        self.group, self.size, self.rank = group, group.size(), group.rank()
        self.hosts = gather_hosts(group)
        self.gather_seconds: float | None = None
        self.trained_tokens = 0
        self.callback = None
        if self.rank == 0 and args.report_to:
            config = {**vars(args), "hosts": self.hosts, "world_size": self.size}
            self.callback = reporting_callbacks(args.report_to, args.project_name,
                                                args.adapter_path, config,
                                                purge_step=start + 1 if start else None)

    def gather(self, seconds: float, loss_sum, tokens, timer) -> list[dict]:
        """One ``all_gather`` of every rank's report window; per-rank records on rank 0.

        ``seconds``: this rank's wall time of the window's steps; ``loss_sum`` and
        ``tokens``: its summed token loss and target-token count (``mx.array`` scalars);
        ``timer``: its :class:`~course_lib.fine_tune.step.PhaseTimer` for the window.
        Rank 0 gets one dict per rank, in rank order: ``rank``, ``host``, ``loss`` (the
        rank's own mean loss per target token, nats; None when it had no target tokens),
        ``tokens``, ``step_seconds`` (wall seconds per step) and, when the timer ran,
        ``forward_backward_seconds`` and
        ``all_reduce_wait_seconds`` (per step; at the all-reduce: waiting for the slowest
        rank plus the exchange, or the barrier's wait plus the all-reduce with
        ``--step-timing``), then ``peak_memory_gb`` (the rank's peak, 1e9 bytes). Other
        ranks get ``[]``. :attr:`gather_seconds` holds the gather's own time (None at 1
        rank, which gathers nothing)."""
        phases = timer.seconds
        mine = mx.array([seconds, phases["forward_backward"],
                         phases["wait"] + phases["all_reduce"], tokens.item(),
                         loss_sum.item(), mx.get_peak_memory() / 1e9], dtype=mx.float32)
        tic = time.perf_counter()
        if self.size == 1:
            rows = [mine.tolist()]
        else:
            rows = mx.distributed.all_gather(mine, group=self.group).reshape(
                self.size, len(GATHERED)).tolist()  # .tolist() evaluates: the gather's time
            self.gather_seconds = time.perf_counter() - tic
        if self.rank != 0:
            return []
        steps = max(timer.steps, 1)
        records = []
        for r, row in enumerate(rows):
            got = dict(zip(GATHERED, row))
            rec = {"rank": r, "host": self.hosts[r],
                   "loss": got["loss_sum"] / got["tokens"] if got["tokens"] else None,
                   "tokens": int(got["tokens"]), "step_seconds": got["seconds"] / steps}
            if timer.enabled:
                rec["forward_backward_seconds"] = got["forward_backward_seconds"] / steps
                rec["all_reduce_wait_seconds"] = got["all_reduce_wait_seconds"] / steps
            rec["peak_memory_gb"] = got["peak_memory_gb"]
            records.append(rec)
        return records

    def cost(self) -> dict:
        """``{"gather_seconds": s}`` of the last :meth:`gather` ({} at 1 rank)."""
        return {} if self.gather_seconds is None else {"gather_seconds": self.gather_seconds}

    def train(self, record: dict, ranks: list[dict]) -> None:
        """Send a train report (``record``: the loop's train record) and the per-rank
        records to the callbacks, in ``mlx_lm``'s names."""
        if self.callback is None:
            return
        self.trained_tokens += record["tokens"]
        info = {"iteration": record["iteration"], "train_loss": record["loss"],
                "learning_rate": record["learning_rate"],
                "iterations_per_second": 1 / ranks[0]["step_seconds"],
                "tokens_per_second": record["tokens_per_second"],
                "trained_tokens": self.trained_tokens,
                "peak_memory": record["peak_memory_gb"], **self.cost()}
        for rec in ranks:
            values = {"train_loss": rec["loss"], "peak_memory": rec["peak_memory_gb"], **rec}
            info.update({f"{m}/rank{rec['rank']}": values[m] for m in RANK_METRICS
                         if m in values})
        self.callback.on_train_loss_report(info)

    def validation(self, iteration: int, loss: float, seconds: float) -> None:
        """Send a validation report to the callbacks, in ``mlx_lm``'s names."""
        if self.callback is not None:
            self.callback.on_val_loss_report({"iteration": iteration, "val_loss": loss,
                                              "val_time": seconds})

    def close(self) -> None:
        """Flush and close what the callbacks opened (TensorBoard's event files)."""
        callback = self.callback
        while callback is not None:
            if hasattr(callback, "close"):
                callback.close()
            callback = getattr(callback, "wrapped_callback", None)


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
