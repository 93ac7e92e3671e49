"""What a run reports: its metric records, log lines and progress bar, every rank's
numbers on rank 0 (:class:`Reporter`).

At each report rank 0 gathers a small vector from every rank in one
``mx.distributed.all_gather`` (host names are gathered once, at the start, as fixed-size
byte arrays, so a report moves only numbers): the rank's step time, its forward+backward
time, its time at the all-reduce, its tokens, its summed token loss and its peak memory.
They become one ``metrics.jsonl`` record per rank (``split: "rank"``, see
:meth:`Reporter.gather`) and one series per rank on the dashboard.

The ``--report-to`` services are :mod:`course_lib.fine_tune.callbacks`'.
"""

from __future__ import annotations

import socket
import sys
import time

import mlx.core as mx
from tqdm import tqdm

from course_lib import distributed as dist
from course_lib.fine_tune.callbacks import reporting_callbacks
from course_lib.fine_tune.speed import PhaseTimer

HOST_BYTES = 256  # a host name is at most 253 characters (RFC 1035)
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


def log(msg: str, bar=None) -> None:
    """Print ``msg`` on rank 0 (the run's lines before and after the loop; inside it,
    :meth:`Reporter.log`, which passes its bar). While a progress bar is shown, through the bar on its
    stream (stderr), so that lines and bar stay whole also when mpirun forwards stdout and
    stderr separately; otherwise on stdout."""
    if dist.rank() != 0:
        return
    if hasattr(bar, "write"):
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, flush=True)


class Window:
    """This rank's sums over a report window: ``loss`` (summed token losses) and
    ``tokens`` (target tokens), lazy ``mx.array`` scalars, and ``seconds`` of its steps."""

    def __init__(self):
        self.loss, self.tokens, self.seconds = mx.array(0.0), mx.array(0), 0.0

    def add(self, loss_sum, ntoks) -> None:
        self.loss, self.tokens = self.loss + loss_sum, self.tokens + ntoks


class Reporter:
    """What a run reports, from every rank: the records of ``metrics.jsonl`` (kept in
    :attr:`history`, written by ``outputs``), the log lines and progress bar on rank 0,
    the per-rank numbers gathered to rank 0, and the ``--report-to`` callbacks.

    Every rank builds one (host names are gathered here, a collective call) and calls
    :meth:`report` at every report (collective too); only rank 0 writes, prints and calls
    the callbacks. ``start`` is the iteration a resumed run continues from (0 for a fresh
    one) and ``history`` the records kept from before it; ``replicas``: how many ranks
    compute each row (N under tensor parallelism), by which summed token counts are
    divided.
    """

    def __init__(self, plan, group, outputs, start: int = 0, history=(), replicas: int = 1):
        self.plan, self.group, self.outputs, self.replicas = plan, group, outputs, replicas
        self.size, self.rank = group.size(), group.rank()
        self.history = list(history)
        self.hosts = gather_hosts(group)
        self.gather_seconds: float | None = None
        self.trained_tokens = 0
        self.train_seconds, self.train_tokens = 0.0, 0
        self.phase_totals = dict.fromkeys(PhaseTimer.PHASES, 0.0)
        self.bar = _NoBar()
        self.callback = None
        if self.rank == 0 and plan.report_to:
            config = {**plan.options, "hosts": self.hosts, "world_size": self.size}
            self.callback = reporting_callbacks(plan.report_to, plan.project_name,
                                                plan.adapter_path, config,
                                                purge_step=start + 1 if start else None)

    def show_progress(self, start: int) -> None:
        """A tqdm bar of the steps on rank 0's stderr, from ``start`` (none on the other
        ranks or with ``--no-progress``)."""
        if self.rank == 0 and not self.plan.no_progress:
            self.bar = tqdm(total=self.plan.iters, initial=start, desc="fine-tune",
                            unit="step", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.5)

    def log(self, msg: str) -> None:
        """:func:`log` through the progress bar."""
        log(msg, self.bar)

    def record(self, kind: str, it: int, loss, **extra) -> dict:
        """A ``metrics.jsonl`` record (``split`` ``kind``), kept and written."""
        rec = {"iteration": it, "split": kind, "loss": loss, "world_size": self.size, **extra}
        self.history.append(rec)
        self.outputs.metric(rec)
        return rec

    def validation(self, it: int, loss: float, seconds: float) -> None:
        """Record, send and log a validation loss."""
        self.record("valid", it, loss, seconds=seconds)
        if self.callback is not None:
            self.callback.on_val_loss_report({"iteration": it, "val_loss": loss,
                                              "val_time": seconds})
        self.log(f"Iter {it}: validation loss {loss:.3f} ({seconds:.1f} s)")

    def report(self, it: int, window: Window, timer: PhaseTimer, learning_rate: float):
        """The train report after step ``it`` (collective): the global loss of the
        ``window`` (every rank's token losses over all their tokens, one ``all_sum``;
        NaN when no rank scored a token), the largest peak memory (``all_max``), every
        rank's own numbers (:meth:`gather`), then records, callbacks, bar and log line.
        Resets ``timer``."""
        totals = dist.all_sum(mx.stack([window.loss, window.tokens.astype(mx.float32)]),
                              self.group)
        scored = totals[1].item()
        loss = totals[0].item() / scored if scored else float("nan")
        toks = int(scored) // self.replicas
        self.train_seconds += window.seconds
        self.train_tokens += toks
        peak = mx.array(mx.get_peak_memory() / 1e9)  # this rank's; report the largest
        if self.size > 1:
            peak = mx.distributed.all_max(peak, group=self.group)
        ranks = self.gather(window.seconds, window.loss, window.tokens, timer)
        extra = self.cost()
        if self.plan.step_timing:
            extra["phase_seconds"] = dict(timer.seconds)
            for k, v in timer.seconds.items():
                self.phase_totals[k] += v
        timer.reset()
        rec = self.record("train", it, loss, tokens=toks, seconds=window.seconds,
                          tokens_per_second=toks / window.seconds,
                          learning_rate=learning_rate, peak_memory_gb=peak.item(), **extra)
        for r in ranks:
            self.record("rank", it, **r)
        self.send_train(rec, ranks)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_second']:.0f}")
        self.log(f"Iter {it}: train loss {loss:.3f}, {rec['tokens_per_second']:.0f} "
                 f"tokens/s, peak memory {rec['peak_memory_gb']:.3f} GB")

    def gather(self, seconds: float, loss_sum, tokens, timer) -> list[dict]:
        """One ``all_gather`` of every rank's report window; per-rank records on rank 0.

        ``seconds``: this rank's wall time of the window's steps; ``loss_sum`` and
        ``tokens``: its summed token loss and target-token count (``mx.array`` scalars);
        ``timer``: its :class:`~course_lib.fine_tune.speed.PhaseTimer` for the window.
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

    def send_train(self, record: dict, ranks: list[dict]) -> None:
        """Send a train report (``record``: the train record) and the per-rank records to
        the callbacks, in ``mlx_lm``'s names."""
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

    def close(self) -> None:
        """Close the bar; flush and close what the callbacks opened (TensorBoard's event
        files)."""
        self.bar.close()
        self.bar = _NoBar()  # later lines (a stop's checkpoint) print as without a bar
        callback = self.callback
        while callback is not None:
            if hasattr(callback, "close"):
                callback.close()
            callback = getattr(callback, "wrapped_callback", None)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass
