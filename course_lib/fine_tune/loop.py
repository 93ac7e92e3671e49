"""The training loop: steps, reports, validation and checkpoints, in one function that
reads top to bottom."""

from __future__ import annotations

import sys
import time

import mlx.core as mx

from course_lib import distributed as dist
from course_lib.fine_tune.batches import GlobalBatches
from course_lib.fine_tune.faults import Watchdog, maybe_fault
from course_lib.fine_tune.outputs import Outputs
from course_lib.fine_tune.step import PhaseTimer, make_step, pad_multiple, training_loss


def validation_loss(model, valid_rows, args, group, share=None) -> float:
    """Mean token loss over ``--val-batches`` global batches of the validation rows (all
    of them for -1): each rank scores its share of each batch and the token losses and
    counts are summed over the ranks, so every world size gives the same number. The same
    batches every time (a fresh :class:`GlobalBatches` from the seed: its first epoch's
    order), with the step's loss (``--loss``) and padding. Leaves the model training.
    ``share`` ``(rank, size)`` picks the rows (default the group's; ``(0, 1)``: all of
    them, as under tensor parallelism, where the sums then count each row N times)."""
    share = share or (group.rank(), group.size())
    loss_fn = training_loss(args, model)
    batches = GlobalBatches(valid_rows, args.batch_size, args.seed)
    n = len(batches.batches) if args.val_batches == -1 else min(args.val_batches,
                                                                  len(batches.batches))
    total, count = mx.array(0.0), mx.array(0)
    model.eval()
    for _ in range(n):
        loss, ntoks = loss_fn(model, *batches.next(*share, args.max_seq_length,
                                                   pad_multiple(args)))
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    model.train()
    totals = dist.all_sum(mx.stack([total, count.astype(mx.float32)]), group)
    return totals[0].item() / totals[1].item()


def train(model, optimizer, train_rows, valid_rows, args, group, outputs: Outputs, log,
          settings: dict, start: int = 0, data_state: dict | None = None,
          history: list[dict] | None = None, sharding=None):
    """The loop: optimizer steps ``start + 1`` to ``args.iters``, with reports, validation
    and checkpoints (which record ``settings`` and the data order).

    Returns ``(history, stats)``: the metric records (earlier ones first, when resuming)
    and totals (seconds of training, tokens). ``sharding`` (a
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
    timer = PhaseTimer(args.step_timing)
    step = make_step(model, optimizer, args, group, timer, sharding)
    state = [model.state, optimizer.state]
    batches = GlobalBatches(train_rows, args.batch_size, args.seed)
    if data_state:
        batches.restore(data_state)
    history = list(history or [])
    watchdog = Watchdog(args.step_timeout, rank)

    def record(kind, it, loss, **extra):
        rec = {"iteration": it, "split": kind, "loss": loss, "world_size": size, **extra}
        history.append(rec)
        outputs.metric(rec)
        return rec

    def validate(it, bar=None):
        if not valid_rows:
            return
        tic = time.perf_counter()
        loss = validation_loss(model, valid_rows, args, group, share)
        record("valid", it, loss, seconds=time.perf_counter() - tic)
        log(f"Iter {it}: validation loss {loss:.3f} ({time.perf_counter() - tic:.1f} s)", bar)
        watchdog.beat()

    model.train()
    if start == 0:
        validate(0)
    bar = _progress_bar(args, group, start)
    window_loss, window_toks, window_time = mx.array(0.0), mx.array(0), 0.0
    train_seconds, train_tokens = 0.0, 0
    phase_totals = dict.fromkeys(PhaseTimer.PHASES, 0.0)
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

        if it % args.steps_per_report == 0 or it == args.iters:
            # Global loss: sum of token losses over all ranks / all their tokens.
            totals = dist.all_sum(mx.stack([window_loss, window_toks.astype(mx.float32)]), group)
            loss, toks = totals[0].item() / totals[1].item(), int(totals[1].item()) // replicas
            train_seconds += window_time
            train_tokens += toks
            peak = mx.array(mx.get_peak_memory() / 1e9)  # this rank's; report the largest
            if size > 1:
                peak = mx.distributed.all_max(peak, group=group)
            extra = {}
            if timer.enabled:
                extra["phase_seconds"] = dict(timer.seconds)
                for k, v in timer.seconds.items():
                    phase_totals[k] += v
                timer.reset()
            rec = record("train", it, loss, tokens=toks, seconds=window_time,
                         tokens_per_second=toks / window_time,
                         learning_rate=float(optimizer.learning_rate.item()),
                         peak_memory_gb=peak.item(), **extra)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_second']:.0f}")
            log(f"Iter {it}: train loss {loss:.3f}, {rec['tokens_per_second']:.0f} tokens/s, "
                f"peak memory {rec['peak_memory_gb']:.3f} GB", bar)
            window_loss, window_toks, window_time = mx.array(0.0), mx.array(0), 0.0

        if it % args.steps_per_eval == 0 or it == args.iters:
            validate(it, bar)
        if it % args.save_every == 0:
            saved = outputs.checkpoint(it, *sharding.whole(model, optimizer),
                                       {"data_order": batches.state(), "settings": settings})
            if saved:
                log(f"Iter {it}: saved checkpoint {saved}", bar)
    bar.close()
    stats = {"train_seconds": train_seconds, "train_tokens": train_tokens}
    if timer.enabled:
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
