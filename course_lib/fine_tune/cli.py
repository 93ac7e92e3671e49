"""``python -m course_lib.fine_tune``: read the options, start the world, resolve the plan,
load, resume or start, train, write the summary; errors as one clear line and an exit
status (:mod:`course_lib.fine_tune.errors`)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx

from course_lib import allocator, blas, checkpoint
from course_lib import distributed as dist
from course_lib.atomic import WriteError
from course_lib.data import DataError
from course_lib.fine_tune import errors
from course_lib.fine_tune.errors import UsageError
from course_lib.fine_tune.faults import peer_lost_message
from course_lib.fine_tune.inputs import add_adapters, check_ranks_agree, load_data, load_model
from course_lib.fine_tune.interrupts import Interrupted, StoppedByRankZero, resume_command
from course_lib.fine_tune.loop import train
from course_lib.fine_tune.options import apply_recipe, build_parser
from course_lib.fine_tune.outputs import Outputs
from course_lib.fine_tune.plan import resolve
from course_lib.fine_tune.reporting import log
from course_lib.fine_tune.resume import run_settings, start_from
from course_lib.fine_tune.sharding import shard_model
from course_lib.fine_tune.speed import order_for_streams
from course_lib.fine_tune.step import make_optimizer
from course_lib.mpi import handle_relayed_signals


def run(args) -> dict:
    """Fine-tune as ``args`` (:func:`build_parser`'s namespace) say; return the summary.

    Raises :class:`UsageError` / :class:`course_lib.data.DataError` on bad input before
    anything is written into ``--adapter-path``, and :class:`FolderInUse` (a UsageError)
    when a live run holds it. On rank 0, :class:`course_lib.atomic.WriteError` when an
    output cannot be written (the other ranks: :class:`StoppedByRankZero`);
    :class:`Interrupted` on every rank after Ctrl-C or SIGTERM (see
    :mod:`course_lib.fine_tune.interrupts`).
    """
    t_start = time.perf_counter()
    allocator.keep_freed_memory()  # before the model's arrays are allocated
    group, backend = dist.init_world(args.backend)
    plan = resolve(args, group.size(), backend, group.rank())
    order_for_streams(plan)  # before anything evaluates
    model, tokenizer, model_id = load_model(plan.model, lazy=plan.sharding != "none",
                                            seed=plan.seed)
    rows = load_data(plan.data, tokenizer, plan)
    num_layers, lora_parameters = add_adapters(model, plan)
    sharding = shard_model(model, plan, group)  # before any weight is read, when lazy
    settings = run_settings(plan, model_id, num_layers, lora_parameters)
    check_ranks_agree(group, model=settings["model"], training_data=settings["train_data"],
                      training_rows=len(rows.train), validation_rows=len(rows.valid))
    optimizer = make_optimizer(plan, model)
    start = start_from(plan, model, optimizer, sharding, settings)
    held = sharding.describe(model)
    _log_plan(plan, rows, held, num_layers, sharding)
    config = {**plan.options, "model": model_id, "model_name": plan.model,
              "data": str(plan.options["data"]) if plan.options["data"] else
              "default sample (data-sets/pirate)", "num_layers": num_layers,
              "lora_parameters": lora_parameters, "world_size": group.size(),
              "backend": backend}
    outputs = Outputs(Path(plan.adapter_path), enabled=group.rank() == 0)
    try:
        start.history = start_outputs(outputs, config, start.iteration or None, group)
        history, stats = train(model, optimizer, rows, plan, sharding, outputs, start)
        summary = summarize(plan, config, held, start.iteration or None, history, stats,
                            time.perf_counter() - t_start, sharding)
        outputs.adapters(sharding.whole(model)[0])
        outputs.finish(summary, history)
    finally:
        outputs.close()
    log(f"Done in {summary['seconds']:.1f} s ({summary['tokens_per_second']:.0f} tokens/s "
        f"training). Adapters, loss.png, metrics.jsonl and summary.json are in "
        f"{plan.adapter_path}")
    return summary


def _log_plan(plan, rows, held: dict, num_layers: int, sharding) -> None:
    """The run's first lines: world, batch, data, recipe, what is trained and held."""
    n_train, n_total = held["trainable"], held["parameters"]
    log(f"{plan.backend} backend, world size {plan.world_size}: global batch "
        f"{plan.batch_size}, {plan.rows_per_rank} rows per rank; "
        f"{len(rows.train)} train / {len(rows.valid)} valid rows")
    log(f"Recipe {plan.recipe}: {plan.iters} steps, learning rate {plan.learning_rate:g}, "
        f"LoRA rank {plan.lora_rank}, mask prompt {'on' if plan.mask_prompt else 'off'}")
    log(f"Trainable parameters: {100 * n_train / n_total:.3f}% "
        f"({n_train / 1e6:.3f}M/{n_total / 1e6:.3f}M), {plan.fine_tune_type}, "
        f"{num_layers} layers")
    for note in sharding.notes:
        log(f"Sharding {note}; this rank holds {held['parameters_held'] / 1e6:.3f}M "
            f"parameters ({held['trainable_held'] / 1e6:.3f}M trainable)")
    if plan.streams > 1:  # speed.StreamSplit shares each rank's OpenBLAS threads out
        threads = blas.blas_threads()
        log(f"Each rank computes its rows as {plan.streams} pieces on concurrent MLX streams "
            f"(--streams; OpenBLAS {max(1, threads // plan.streams) if threads else '?'} "
            "thread(s) per stream)")


def start_outputs(outputs: Outputs, config: dict, resume_from: int | None, group) -> list:
    """``outputs.start`` on rank 0, and its failure on every rank: rank 0 raises it
    (:class:`FolderInUse`, :class:`course_lib.atomic.WriteError`), the others
    :class:`StoppedByRankZero`, so that none waits in an all-reduce for a rank 0 that left.
    Returns the metric records kept from before ``resume_from``."""
    kept, error = [], None
    try:
        kept = outputs.start(config, resume_from=resume_from)
    except (UsageError, WriteError) as e:
        error = e
    status = dist.broadcast_json(None if error is None else errors.exit_status(error), group)
    if status is not None:
        raise error if group.rank() == 0 else StoppedByRankZero(status)
    return kept


def summarize(plan, config: dict, held: dict, resumed_from: int | None, history: list,
              stats: dict, seconds: float, sharding) -> dict:
    """What ``summary.json`` holds (see the package's docstring). Collective: every rank's
    peak memory is gathered (before the final save)."""
    peaks = mx.array([mx.get_peak_memory() / 1e9])
    peaks = (mx.distributed.all_gather(peaks, group=sharding.group)
             if plan.world_size > 1 else peaks).tolist()
    # Windows that scored no token have no loss (NaN in memory, null once read back).
    has_loss = lambda h: h["loss"] is not None and h["loss"] == h["loss"]  # noqa: E731
    train_losses = [h["loss"] for h in history if h["split"] == "train" and has_loss(h)]
    valid_losses = [h["loss"] for h in history if h["split"] == "valid" and has_loss(h)]
    summary = {
        "backend": plan.backend,
        "world_size": plan.world_size,
        "iterations": plan.iters,
        "global_batch": plan.batch_size,
        "per_rank_batch": plan.rows_per_rank,
        "loss_weighting": plan.loss_weighting,
        "all_reduce": plan.all_reduce,
        "compiled": plan.compile,
        "loss": stats["loss"],
        "streams_per_rank": stats["streams"],
        "seconds": seconds,
        "train_seconds": stats["train_seconds"],
        "train_tokens": stats["train_tokens"],
        "tokens_per_second": stats["train_tokens"] / max(stats["train_seconds"], 1e-9),
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "initial_valid_loss": valid_losses[0] if valid_losses else None,
        "final_valid_loss": valid_losses[-1] if valid_losses else None,
        "peak_memory_gb": max((h["peak_memory_gb"] for h in history if "peak_memory_gb" in h),
                              default=None),
        "model": config["model"],
        "trainable_parameters": held["trainable"],
        "mlx_version": mx.__version__,
        "blas": os.environ.get("COURSE_LIB_FAST_BLAS_ACTIVE", "bundled"),
        "resumed_from": resumed_from,
    }
    if "step_seconds" in stats:  # mean seconds per step in each phase (rank 0's clock)
        summary["step_seconds"] = stats["step_seconds"]
    summary.update(sharding=held, peak_memory_gb_per_rank=peaks,
                   collective_bytes_per_step=sharding.traffic.summary(
                       plan.iters - (resumed_from or 0)))
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (:mod:`course_lib.fine_tune.errors`), each
    failure with one clear line (on rank 0 for a failed write and a signal)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    handle_relayed_signals()
    args = build_parser().parse_args(argv)
    apply_recipe(args)  # for the messages below (--iters); resolve() fills a copy itself
    folder = Path(args.adapter_path)
    try:
        run(args)
    except (UsageError, DataError) as e:
        prefix = "" if dist.world_size() == 1 else f"[rank {dist.rank()}] "
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return errors.exit_status(e)
    except WriteError as e:  # rank 0; the others stop with StoppedByRankZero
        print(f"error: {e}. {_what_is_kept(folder)}", file=sys.stderr, flush=True)
        return errors.exit_status(e)
    except StoppedByRankZero as e:
        return errors.exit_status(e)
    except Interrupted as e:
        if dist.rank() == 0:
            print(_interrupted_message(e, args, argv), file=sys.stderr, flush=True)
        return errors.exit_status(e)
    except KeyboardInterrupt as e:  # before training started (then StopAgreement handles it)
        print("Interrupted before training started; nothing to save.", file=sys.stderr,
              flush=True)
        return errors.exit_status(e)
    except RuntimeError as e:
        # The ring backend raises when a peer's connection drops (a rank died); MPI instead
        # has mpirun end every rank and name the dead one itself.
        if "[ring]" not in str(e):
            raise
        last = checkpoint.latest(folder)
        kept = (f"the last complete checkpoint (iteration {last}) is intact: continue with "
                "--resume" if last is not None else "no checkpoint was written yet")
        print(f"error: {peer_lost_message(dist.world(), 'ring', e)} Stopping; {kept}.",
              file=sys.stderr, flush=True)
        return errors.PEER_LOST
    return 0


def _what_is_kept(folder: Path) -> str:
    last = checkpoint.latest(folder)
    if last is None:
        return "No checkpoint was written yet"
    return (f"The checkpoint at iteration {last} in {folder} is whole: continue with --resume "
            "once the folder can be written")


def _interrupted_message(e: Interrupted, args, argv: list[str]) -> str:
    """What rank 0 prints when a signal stopped the run: what was saved, and the command
    that continues."""
    size = dist.world_size()
    name = signal.Signals(e.signum).name
    where = (" on " + ", ".join(f"rank {r}" for r in sorted(e.ranks))) if size > 1 else ""
    text = f"Stopped by {name}{where} after step {e.iteration} of {args.iters}: "
    if e.saved is not None:
        text += f"saved the checkpoint at iteration {e.saved} in {args.adapter_path}."
    else:
        text += f"could not save a checkpoint ({e.save_error})."
        last = checkpoint.latest(Path(args.adapter_path))
        if last is None:
            return (text + " No checkpoint to continue from; start again with:\n  "
                    + resume_command(argv, size, dist.detect_backend() or "", resume=False))
        text += f" The checkpoint at iteration {last} is whole."
    return (text + " Continue with:\n  "
            + resume_command(argv, size, dist.detect_backend() or ""))
