"""The training loop: steps, reports, validation and checkpoints, in one function that
reads top to bottom (:func:`train`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.tuner.trainer import grad_checkpoint

from course_lib import distributed as dist
from course_lib.fine_tune.batches import GlobalBatches
from course_lib.fine_tune.errors import WRITE_FAILED
from course_lib.fault_injection import arm_timed_fault, maybe_fault
from course_lib.fine_tune.faults import Watchdog
from course_lib.fine_tune.inputs import Rows
from course_lib.fine_tune.interrupts import Interrupted, StopAgreement, StoppedByRankZero
from course_lib.fine_tune.loss import loss_function, scores_any
from course_lib.fine_tune.reporting import Reporter, Window
from course_lib.fine_tune.speed import PhaseTimer, StreamSplit
from course_lib.fine_tune.step import make_step


@dataclass
class Start:
    """Where the loop starts: after step ``iteration`` (0: a fresh run), with the data
    order ``data_order`` (:meth:`GlobalBatches.state`) and the metric records ``history``
    kept from before; ``settings`` is what every checkpoint records
    (:func:`course_lib.fine_tune.resume.run_settings`)."""

    iteration: int = 0
    data_order: dict | None = None
    history: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def train(model, optimizer, rows: Rows, plan, sharding, outputs, start: Start | None = None):
    """Optimizer steps ``start.iteration + 1`` to ``plan.iters`` of ``model`` (adapters
    added, split by ``sharding``, which decides each rank's rows) with ``optimizer``; reports,
    validation and checkpoints into ``outputs``. Returns ``(history, stats)``: the metric
    records (earlier ones first, when resuming) and totals (seconds of training, tokens, the
    loss function's name, streams). After every step the ranks agree whether to stop
    (:mod:`course_lib.fine_tune.interrupts`): after Ctrl-C or SIGTERM on any rank, rank 0
    saves that step and every rank raises :class:`Interrupted`; when rank 0 could not
    write, it raises :attr:`Outputs.error` and the others :class:`StoppedByRankZero`."""
    start, group, rank = start or Start(), sharding.group, sharding.group.rank()
    # Ctrl-C and SIGTERM stop every rank together; a rank whose peer hangs ends itself.
    with StopAgreement(group) as stop, Watchdog(plan.step_timeout, rank) as watchdog:
        share = sharding.data_share()
        if plan.grad_checkpoint:
            grad_checkpoint(model.layers[0])
        timer = PhaseTimer(plan.step_timing or plan.rank_timing, barrier=plan.step_timing)
        loss_name, loss_fn = loss_function(plan.loss, model)
        split = StreamSplit(plan.streams, plan.pad_multiple)
        step = make_step(model, optimizer, plan, sharding, loss_fn, timer, split)
        batches = GlobalBatches(rows.train, plan.batch_size, plan.seed)
        if start.data_order:
            batches.restore(start.data_order)
        arm_timed_fault(rank)

        def validate(it):
            if rows.valid:
                maybe_fault(rank, f"eval-{it}")
                tic = time.perf_counter()
                loss = validation_loss(model, rows.valid, plan, group, loss_fn, share, split)
                reporter.validation(it, loss, time.perf_counter() - tic)
                watchdog.beat()

        def save(it):
            saved = outputs.checkpoint(it, *sharding.whole(model, optimizer),
                                       {"data_order": batches.state(), "settings": start.settings})
            if saved:
                reporter.log(f"Iter {it}: saved checkpoint {saved}")
            return saved

        reporter = Reporter(plan, group, outputs, start.iteration, start.history,
                            sharding.replicas())
        model.train()
        if start.iteration == 0:
            validate(0)
        reporter.show_progress(start.iteration)
        window, stopping = Window(), False
        for it in range(start.iteration + 1, plan.iters + 1):
            maybe_fault(rank, it)
            tic = time.perf_counter()
            timer.start()
            # Dropout draws from MLX's generator: reseed per step so masks depend only on
            # the seed and the step, and a resumed run draws what an unbroken run would.
            mx.random.seed(plan.seed * 1_000_003 + it)
            micro = [batches.next(*share, plan.max_seq_length, plan.pad_multiple)
                     for _ in range(plan.grad_accumulation_steps)]
            timer.lap("data", *[a for pair in micro for a in pair])
            window.add(*step(micro))
            mx.eval([model.state, optimizer.state], window.loss, window.tokens)
            window.seconds += time.perf_counter() - tic
            watchdog.beat()
            reporter.bar.update(1)
            # Did any rank get Ctrl-C/SIGTERM, or rank 0 fail to write? All ranks learn it
            # here, in one small all-reduce, and stop after this same step (interrupts.py).
            stopping = stop.agree(write_failed=outputs.error is not None) and it < plan.iters
            if it % plan.steps_per_report == 0 or it == plan.iters or stopping:
                reporter.report(it, window, timer, float(optimizer.learning_rate.item()))
                window = Window()
            if stopping:
                break
            if it % plan.steps_per_eval == 0 or it == plan.iters:
                validate(it)
            if it % plan.save_every == 0:
                save(it)
        reporter.close()
        if stopping:
            _stop_after(it, stop, outputs, save, group)
    stats = {"train_seconds": reporter.train_seconds, "train_tokens": reporter.train_tokens,
             "loss": loss_name, "streams": split.parts}
    if plan.step_timing:
        stats["step_seconds"] = {k: v / (plan.iters - start.iteration)
                                 for k, v in reporter.phase_totals.items()}
    return reporter.history, stats


def _stop_after(it: int, stop: StopAgreement, outputs, save, group):
    """Raise what ends a run the ranks agreed to stop after step ``it``: rank 0's write
    error (the others: :class:`StoppedByRankZero`), else :class:`Interrupted` once rank 0
    saved step ``it`` as a checkpoint and every rank waited for it."""
    if stop.write_failed:  # rank 0 could not write: it names the file and the cause
        raise outputs.error if group.rank() == 0 else StoppedByRankZero(WRITE_FAILED)
    saved = save(it) if group.rank() == 0 else None
    dist.barrier(group)  # the others wait for the save: mpirun ends all once one exits
    raise Interrupted(stop.signum, stop.ranks, it, it if saved else None, outputs.error)


def validation_loss(model, valid_rows, plan, group, loss_fn, share=None,
                    split: StreamSplit | None = None) -> float:
    """Mean token loss over ``plan.val_batches`` global batches of the validation rows
    (every full batch for -1; the last partial one is left out, as in training): each rank
    scores its share of each batch and the token losses and counts are summed over the
    ranks, so every world size gives the same number. The same batches every time (a fresh
    :class:`GlobalBatches` from the seed: its first epoch's order), with the step's loss
    function ``loss_fn`` and padding. Leaves the model training. ``share`` ``(rank, size)``
    picks the rows (default the group's; ``(0, 1)``: all of them, as under tensor
    parallelism, where the sums then count each row N times). ``split`` computes each
    batch as pieces on concurrent streams, as the step does (``--streams``). NaN
    when those batches score no token (``--max-seq-length`` cut every response off)."""
    split = split or StreamSplit(1)
    share = share or (group.rank(), group.size())
    # Under sharding every rank runs every forward pass (its collectives): none is skipped.
    skip = plan.sharding == "none"
    batches = GlobalBatches(valid_rows, plan.batch_size, plan.seed)
    n = len(batches.batches) if plan.val_batches == -1 else min(plan.val_batches,
                                                                  len(batches.batches))
    total, count = mx.array(0.0), mx.array(0)
    model.eval()
    for _ in range(n):
        pieces = split.map(lambda b, l: None if skip and not scores_any(b, l) else
                           loss_fn(model, b, l),
                           *batches.next(*share, plan.max_seq_length, plan.pad_multiple))
        for loss, ntoks in filter(None, pieces):  # None: a piece that scores no token
            total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    model.train()
    totals = dist.all_sum(mx.stack([total, count.astype(mx.float32)]), group)
    scored = totals[1].item()  # 0: every row cut off before its response
    return totals[0].item() / scored if scored else float("nan")
