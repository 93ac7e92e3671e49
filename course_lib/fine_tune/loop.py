"""The training loop: steps, reports, validation and checkpoints, in one function that
reads top to bottom."""

from __future__ import annotations

import sys
import time

import mlx.core as mx

from course_lib import blas
from course_lib import distributed as dist
from course_lib.fine_tune.batches import GlobalBatches
from course_lib.fine_tune.faults import Watchdog, arm_timed_fault, maybe_fault
from course_lib.fine_tune.interrupts import Interrupted, StopAgreement, StoppedByRankZero
from course_lib.fine_tune.loss import scores_any
from course_lib.fine_tune.outputs import Outputs
from course_lib.fine_tune.reporting import Reporter
from course_lib.fine_tune.step import (PhaseTimer, StreamSplit, make_step, pad_multiple,
                                       resolve_compile, resolve_streams, training_loss)


def validation_loss(model, valid_rows, args, group, loss_fn, share=None,
                    split: StreamSplit | None = None) -> float:
    """Mean token loss over ``--val-batches`` global batches of the validation rows (every
    full batch for -1; the last partial one is left out, as in training): each rank scores
    its share of each batch and the token losses and counts are summed over the ranks, so
    every world size gives the same number. The same batches every time (a fresh
    :class:`GlobalBatches` from the seed: its first epoch's order), with the step's loss
    function ``loss_fn`` and padding. Leaves the model training. ``share`` ``(rank, size)``
    picks the rows (default the group's; ``(0, 1)``: all of them, as under tensor
    parallelism, where the sums then count each row N times). ``split`` computes each
    batch as pieces on concurrent streams, as the step does (``--streams``). NaN
    when those batches score no token (``--max-seq-length`` cut every response off)."""
    split = split or StreamSplit(1)
    share = share or (group.rank(), group.size())
    batches = GlobalBatches(valid_rows, args.batch_size, args.seed)
    n = len(batches.batches) if args.val_batches == -1 else min(args.val_batches,
                                                                  len(batches.batches))
    total, count = mx.array(0.0), mx.array(0)
    model.eval()
    for _ in range(n):
        pieces = split.map(lambda b, l: loss_fn(model, b, l) if scores_any(b, l) else None,
                           *batches.next(*share, args.max_seq_length, pad_multiple(args)))
        for loss, ntoks in filter(None, pieces):  # None: a piece that scores no token
            total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    model.train()
    totals = dist.all_sum(mx.stack([total, count.astype(mx.float32)]), group)
    scored = totals[1].item()  # 0: every row cut off before its response
    return totals[0].item() / scored if scored else float("nan")


def train(model, optimizer, train_rows, valid_rows, args, group, outputs: Outputs, log,
          settings: dict, start: int = 0, data_state: dict | None = None,
          history: list[dict] | None = None, stop: StopAgreement | None = None,
          sharding=None):
    """The loop: optimizer steps ``start + 1`` to ``args.iters``, with reports, validation
    and checkpoints (which record ``settings`` and the data order).

    After every step the ranks agree whether to stop (``stop``, see
    :mod:`course_lib.fine_tune.interrupts`): on Ctrl-C or SIGTERM on any rank, rank 0
    saves that step as a checkpoint and every rank raises :class:`Interrupted`; when rank
    0 could not write, it raises :attr:`Outputs.error` and the other ranks
    :class:`StoppedByRankZero`.

    Returns ``(history, stats)``: the metric records (earlier ones first, when resuming)
    and totals (seconds of training, tokens, the loss function's name). ``sharding`` (a
    :class:`course_lib.fine_tune.sharding.Sharding`) decides each rank's rows and makes
    checkpoints whole.
    """
    from course_lib.fine_tune.sharding import Sharding
    from mlx_lm.tuner.trainer import grad_checkpoint

    size, rank = group.size(), group.rank()
    sharding = sharding or Sharding("none", group)
    share, replicas = sharding.data_share(), sharding.replicas()
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    timer = PhaseTimer(args.step_timing or args.rank_timing, barrier=args.step_timing)
    loss_name, loss_fn = training_loss(args, model)
    split = StreamSplit(resolve_streams(args.streams, args.batch_size // share[1],
                                        sharded=sharding.sharded,
                                        compiled=resolve_compile(args.compile),
                                        full=args.fine_tune_type == "full"),
                        pad_multiple(args))
    step = make_step(model, optimizer, args, group, timer, loss_fn, sharding, split)
    if split.parts > 1:
        log(f"Each rank computes its rows as {split.parts} pieces on concurrent MLX streams "
            f"(--streams; OpenBLAS {blas.blas_threads() or '?'} thread(s) per stream)")
    state = [model.state, optimizer.state]
    batches = GlobalBatches(train_rows, args.batch_size, args.seed)
    if data_state:
        batches.restore(data_state)
    history = list(history or [])
    watchdog = Watchdog(args.step_timeout, rank)
    stop = stop or StopAgreement(group)
    arm_timed_fault(rank)
    reporter = Reporter(group, args, start)  # per-rank numbers and --report-to

    def record(kind, it, loss, **extra):
        rec = {"iteration": it, "split": kind, "loss": loss, "world_size": size, **extra}
        history.append(rec)
        outputs.metric(rec)
        return rec

    def validate(it, bar=None):
        if not valid_rows:
            return
        maybe_fault(rank, f"eval-{it}")
        tic = time.perf_counter()
        loss = validation_loss(model, valid_rows, args, group, loss_fn, share, split)
        seconds = time.perf_counter() - tic
        record("valid", it, loss, seconds=seconds)
        reporter.validation(it, loss, seconds)
        log(f"Iter {it}: validation loss {loss:.3f} ({seconds:.1f} s)", bar)
        watchdog.beat()

    def save(it, bar=None):
        saved = outputs.checkpoint(it, *sharding.whole(model, optimizer),
                                   {"data_order": batches.state(), "settings": settings})
        if saved:
            log(f"Iter {it}: saved checkpoint {saved}", bar)
        return saved

    def stop_after(it):
        if stop.write_failed:  # rank 0 could not write: it names the file and the cause
            raise outputs.error if rank == 0 else StoppedByRankZero(5)
        saved = save(it) if rank == 0 else None
        dist.barrier(group)  # the others wait for the save: mpirun ends all once one exits
        raise Interrupted(stop.signum, stop.ranks, it, it if saved else None, outputs.error)

    model.train()
    if start == 0:
        validate(0)
    bar = _progress_bar(args, group, start)
    window_loss, window_toks, window_time = mx.array(0.0), mx.array(0), 0.0
    train_seconds, train_tokens = 0.0, 0
    phase_totals = dict.fromkeys(PhaseTimer.PHASES, 0.0)
    stopping = False
    for it in range(start + 1, args.iters + 1):
        maybe_fault(rank, it)
        tic = time.perf_counter()
        timer.start()
        # Dropout draws from MLX's generator: reseed per step so masks depend only on the
        # seed and the step, and a resumed run draws the ones an uninterrupted run would.
        mx.random.seed(args.seed * 1_000_003 + it)
        micro = [batches.next(*share, args.max_seq_length, pad_multiple(args))
                 for _ in range(args.grad_accumulation_steps)]
        timer.lap("data", *[a for pair in micro for a in pair])
        loss_sum, ntoks = step(micro)
        window_loss, window_toks = window_loss + loss_sum, window_toks + ntoks
        mx.eval(state, window_loss, window_toks)
        window_time += time.perf_counter() - tic
        watchdog.beat()
        bar.update(1)
        # Did any rank get Ctrl-C/SIGTERM, or rank 0 fail to write? All ranks learn it
        # here, in one small all-reduce, and stop after this same step (interrupts.py).
        # After the last step the run ends anyway.
        stopping = stop.agree(write_failed=outputs.error is not None) and it < args.iters

        if it % args.steps_per_report == 0 or it == args.iters or stopping:
            # Global loss: sum of token losses over all ranks / all their tokens.
            totals = dist.all_sum(mx.stack([window_loss, window_toks.astype(mx.float32)]), group)
            scored = totals[1].item()
            # NaN for a window whose rows score no token (prompts cut by --max-seq-length):
            # its mean is undefined (its steps' gradients were 0).
            loss = totals[0].item() / scored if scored else float("nan")
            toks = int(scored) // replicas
            train_seconds += window_time
            train_tokens += toks
            peak = mx.array(mx.get_peak_memory() / 1e9)  # this rank's; report the largest
            if size > 1:
                peak = mx.distributed.all_max(peak, group=group)
            # Each rank's own numbers (step time, its wait at the all-reduce, tokens,
            # memory) to rank 0 in one all_gather: the dashboard's series per rank.
            ranks = reporter.gather(window_time, window_loss, window_toks, timer)
            extra = reporter.cost()
            if args.step_timing:
                extra["phase_seconds"] = dict(timer.seconds)
                for k, v in timer.seconds.items():
                    phase_totals[k] += v
            timer.reset()
            rec = record("train", it, loss, tokens=toks, seconds=window_time,
                         tokens_per_second=toks / window_time,
                         learning_rate=float(optimizer.learning_rate.item()),
                         peak_memory_gb=peak.item(), **extra)
            for r in ranks:
                record("rank", it, **r)
            reporter.train(rec, ranks)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_second']:.0f}")
            log(f"Iter {it}: train loss {loss:.3f}, {rec['tokens_per_second']:.0f} tokens/s, "
                f"peak memory {rec['peak_memory_gb']:.3f} GB", bar)
            window_loss, window_toks, window_time = mx.array(0.0), mx.array(0), 0.0

        if stopping:
            break
        if it % args.steps_per_eval == 0 or it == args.iters:
            validate(it, bar)
        if it % args.save_every == 0:
            save(it, bar)
    bar.close()
    reporter.close()
    if stopping:
        stop_after(it)
    stats = {"train_seconds": train_seconds, "train_tokens": train_tokens, "loss": loss_name,
             "streams": split.parts}
    if args.step_timing:
        stats["step_seconds"] = {k: v / (args.iters - start) for k, v in phase_totals.items()}
    return history, stats


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress_bar(args, group, start: int = 0):
    """A tqdm bar on rank 0's stderr (nothing on other ranks or with --no-progress)."""
    if group.rank() != 0 or args.no_progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=args.iters, initial=start, desc="fine-tune", unit="step",
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
