"""``python -m course_lib.fine_tune``: read the options, start the world, load, resume or
start, train, write the summary; errors as one clear line and an exit status."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim

from course_lib import allocator, checkpoint, models
from course_lib import distributed as dist
from course_lib.atomic import WriteError
from course_lib.data import DataError
from course_lib.fine_tune.faults import peer_lost_message
from course_lib.fine_tune.inputs import add_adapters, load_data, load_model, load_resume_weights
from course_lib.fine_tune.interrupts import (Interrupted, StopAgreement, StoppedByRankZero,
                                             resume_command)
from course_lib.fine_tune.loop import train
from course_lib.mpi import handle_relayed_signals
from course_lib.fine_tune.options import (DEFAULT_DATA, UsageError, apply_recipe, build_parser,
                                          check_options)
from course_lib.fine_tune.outputs import Outputs
from course_lib.fine_tune.sharding import check_sharding, shard_model
from course_lib.fine_tune.step import order_for_streams, resolve_all_reduce, resolve_compile


def run_settings(args, model_id: str, num_layers: int, lora_parameters, data_dir: Path,
                 world_size: int) -> dict:
    """What decides a run's trajectory; a checkpoint continues only under equal settings.

    The world size counts only where it changes the numbers: with ``--loss-weighting
    ranks`` (the mean of per-rank means depends on the split) or LoRA dropout (masks are
    drawn per rank). Otherwise N ranks compute the 1-rank update, so a checkpoint from 2
    ranks may continue on 1 or 4.
    """
    settings = {
        "model": models.identity(model_id), "fine_tune_type": args.fine_tune_type,
        "num_layers": num_layers, "lora_parameters": lora_parameters, "batch_size": args.batch_size, "seed": args.seed,
        "grad_accumulation_steps": args.grad_accumulation_steps,
        "max_seq_length": args.max_seq_length, "mask_prompt": args.mask_prompt,
        "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps,
        "loss_weighting": args.loss_weighting,
        "train_data": checkpoint.fingerprint(data_dir / "train.jsonl"),
    }
    if args.loss_weighting == "ranks" or (lora_parameters or {}).get("dropout", 0) > 0:
        settings["world_size"] = world_size
    return settings


def check_ranks_agree(group, **values) -> None:
    """Raise :class:`UsageError` on every rank when ``values`` (numbers, or strings compared
    by a CRC-32) differ between ranks: a host with another model or other data would
    train something else, and a rank that skipped a collective the others make would block
    them. Two small all-reduces (``all_max`` and ``all_min``); nothing at one rank."""
    import zlib

    if group.size() == 1:
        return
    numbers = [zlib.crc32(v.encode()) & 0xFFFFFF if isinstance(v, str) else v
               for v in values.values()]  # 24 bits: exact in float32
    here = mx.array(numbers, dtype=mx.float32)
    high = mx.distributed.all_max(here, group=group).tolist()
    low = mx.distributed.all_min(here, group=group).tolist()
    differ = [k.replace("_", " ") for k, h, lo in zip(values, high, low) if h != lo]
    if differ:
        raise UsageError(f"the ranks do not agree on their inputs: {', '.join(differ)} differ "
                         "between ranks; give every host the same model and data (the same "
                         "checkout and set-up at the same path)")


def learning_rate_schedule(args):
    """Adam's learning rate: ``--learning-rate``, or with ``--warmup-steps W`` a linear
    warm-up to it: step k (from 0) uses ``lr * min(k + 1, W) / W`` (Goyal et al. 2017, for
    large global batches). A function of the optimizer's step count, so it resumes
    exactly."""
    lr, warmup = args.learning_rate, args.warmup_steps
    if not warmup:
        return lr
    return lambda step: lr * mx.minimum(step + 1, warmup).astype(mx.float32) / warmup


def resume_point(args, group) -> tuple[Path, int] | None:
    """``(folder, iteration)`` of the checkpoint to continue, or None for a fresh start.

    ``--resume``: the newest complete checkpoint in ``--adapter-path``.
    ``--resume-adapter-file 000000N_adapters.safetensors`` with its state file beside it:
    that checkpoint. Decided on rank 0 (which holds the files) and sent to every rank, so
    all ranks agree, also on the error: :class:`UsageError` when ``--resume`` finds none.
    """
    decision = None
    if group.rank() == 0:
        if args.resume:
            folder = Path(args.adapter_path)
            it = checkpoint.latest(folder)
            decision = ({"folder": str(folder), "iteration": it} if it is not None else
                        {"error": f"--resume: no complete checkpoint in {folder} (a checkpoint "
                                  "is NNNNNNN_adapters.safetensors, NNNNNNN_optimizer."
                                  "safetensors and NNNNNNN_state.json)"})
        elif args.resume_adapter_file:
            it = checkpoint.iteration_of(args.resume_adapter_file)
            if it is not None:
                decision = {"folder": str(Path(args.resume_adapter_file).parent),
                            "iteration": it}
    decision = checkpoint.broadcast_json(decision, group)
    if decision is None:
        return None
    if "error" in decision:
        raise UsageError(decision["error"])
    return Path(decision["folder"]), decision["iteration"]



def run(args) -> dict:
    """Fine-tune as ``args`` say (see :func:`build_parser`); return the summary.

    Raises :class:`UsageError` / :class:`course_lib.data.DataError` on bad input before
    anything is written into ``--adapter-path``, and :class:`FolderInUse` (a UsageError)
    when a live run holds it. On rank 0, :class:`course_lib.atomic.WriteError` when an
    output cannot be written (the other ranks: :class:`StoppedByRankZero`);
    :class:`Interrupted` on every rank after Ctrl-C or SIGTERM (see
    :mod:`course_lib.fine_tune.interrupts`).
    """
    t_start = time.perf_counter()
    order_for_streams(args)  # before anything evaluates
    allocator.keep_freed_memory()  # before the model's arrays are allocated
    group, backend = dist.init_world(args.backend)
    size, rank = group.size(), group.rank()
    recipe = apply_recipe(args)
    check_options(args, size)
    check_sharding(args, size)

    def log(msg, bar=None):
        """Print on rank 0. While a progress bar is shown, through the bar on its stream
        (stderr), so that lines and bar stay whole also when mpirun forwards stdout and
        stderr separately; otherwise on stdout."""
        if rank != 0:
            return
        if hasattr(bar, "write"):
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    data_dir = Path(args.data) if args.data else DEFAULT_DATA
    model, tokenizer, model_id = load_model(args.model, lazy=args.sharding != "none",
                                            seed=args.seed)
    train_rows, valid_rows = load_data(data_dir, tokenizer, args)
    num_layers, lora_parameters = add_adapters(model, args)
    sharding = shard_model(model, args, group)  # before any weight is read, when lazy
    settings = run_settings(args, model_id, num_layers, lora_parameters, data_dir, size)
    check_ranks_agree(group, model=settings["model"], training_data=settings["train_data"],
                      training_rows=len(train_rows), validation_rows=len(valid_rows))
    optimizer = optim.Adam(learning_rate=learning_rate_schedule(args))
    optimizer.init(model.trainable_parameters())

    start, data_state = 0, None
    resume = resume_point(args, group)
    if resume is not None:
        folder, start = resume
        saved = checkpoint.read_state(folder, start, group)
        problems = checkpoint.mismatches(saved["settings"], settings)
        if problems:
            raise UsageError(f"cannot continue the checkpoint at iteration {start} in {folder} "
                             "exactly; these settings differ: " + "; ".join(problems))
        if args.iters <= start:
            raise UsageError(f"--iters {args.iters}: the checkpoint is already at iteration "
                             f"{start}; ask for more iterations to continue")
        try:
            checkpoint.restore(folder, start, model, optimizer, group, sharding)
        except ValueError as e:
            raise UsageError(f"cannot continue the checkpoint at iteration {start} in "
                             f"{folder}: {e}") from e
        data_state = saved["data_order"]
        log(f"Resuming from the checkpoint at iteration {start} in {folder}")
    elif args.resume_adapter_file:  # a plain adapter file: mlx_lm's meaning, weights only
        load_resume_weights(model, args.resume_adapter_file, sharding)
        log(f"Starting from the weights in {args.resume_adapter_file} (no checkpoint state "
            "beside it: optimizer and data order start afresh)")

    held = sharding.describe(model)
    n_train, n_total = held["trainable"], held["parameters"]
    log(f"{backend} backend, world size {size}: global batch {args.batch_size}, "
        f"{args.batch_size // sharding.data_share()[1]} rows per rank; {len(train_rows)} "
        f"train / {len(valid_rows)} valid rows")
    log(f"Recipe {recipe}: {args.iters} steps, learning rate {args.learning_rate:g}, "
        f"LoRA rank {args.lora_rank}, mask prompt {'on' if args.mask_prompt else 'off'}")
    log(f"Trainable parameters: {100 * n_train / n_total:.3f}% "
        f"({n_train / 1e6:.3f}M/{n_total / 1e6:.3f}M), {args.fine_tune_type}, "
        f"{num_layers} layers")
    for note in sharding.notes:
        log(f"Sharding {note}; this rank holds {held['parameters_held'] / 1e6:.3f}M "
            f"parameters ({held['trainable_held'] / 1e6:.3f}M trainable)")

    config = dict(vars(args))
    config.update(model=model_id, model_name=args.model,
                  data=str(args.data) if args.data else "default sample (data-sets/pirate)",
                  num_layers=num_layers, lora_parameters=lora_parameters,
                  world_size=size, backend=backend)
    outputs = Outputs(Path(args.adapter_path), enabled=rank == 0)
    try:
        kept = start_outputs(outputs, config, start if resume is not None else None, group)
        with StopAgreement(group) as stop:  # Ctrl-C and SIGTERM stop every rank together
            history, stats = train(model, optimizer, train_rows, valid_rows, args, group,
                                   outputs, log, settings, start=start, data_state=data_state,
                                   history=kept, stop=stop, sharding=sharding)
        peaks = mx.array([mx.get_peak_memory() / 1e9])  # each rank's, before the final save
        peaks = (mx.distributed.all_gather(peaks, group=group) if size > 1 else peaks).tolist()
        summary = _summary(args, backend, group, config, n_train,
                           start if resume is not None else None, history, stats,
                           time.perf_counter() - t_start, sharding)
        summary.update(sharding=held, peak_memory_gb_per_rank=peaks,
                       collective_bytes_per_step=sharding.traffic.summary(args.iters - start))
        outputs.adapters(sharding.whole(model)[0])
        outputs.finish(summary, history)
    finally:
        outputs.close()
    log(f"Done in {summary['seconds']:.1f} s ({summary['tokens_per_second']:.0f} tokens/s "
        f"training). Adapters, loss.png, metrics.jsonl and summary.json are in "
        f"{args.adapter_path}")
    return summary


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
    status = checkpoint.broadcast_json(None if error is None else
                                       2 if isinstance(error, UsageError) else 5, group)
    if status is not None:
        raise error if group.rank() == 0 else StoppedByRankZero(status)
    return kept


def _summary(args, backend, group, config, n_train, resumed_from, history, stats,
             seconds, sharding) -> dict:
    """What ``summary.json`` holds (see the package's docstring), less what ``run`` adds
    about sharding."""
    size = group.size()
    # Windows that scored no token have no loss (NaN in memory, null once read back).
    has_loss = lambda h: h["loss"] is not None and h["loss"] == h["loss"]  # noqa: E731
    train_losses = [h["loss"] for h in history if h["split"] == "train" and has_loss(h)]
    valid_losses = [h["loss"] for h in history if h["split"] == "valid" and has_loss(h)]
    summary = {
        "backend": backend,
        "world_size": size,
        "iterations": args.iters,
        "global_batch": args.batch_size,
        "per_rank_batch": args.batch_size // sharding.data_share()[1],
        "loss_weighting": args.loss_weighting,
        "all_reduce": resolve_all_reduce(args.all_reduce, group),
        "compiled": resolve_compile(args.compile),
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
        "trainable_parameters": n_train,
        "mlx_version": mx.__version__,
        "blas": os.environ.get("COURSE_LIB_FAST_BLAS_ACTIVE", "bundled"),
        "resumed_from": resumed_from,
    }
    if "step_seconds" in stats:  # mean seconds per step in each phase (rank 0's clock)
        summary["step_seconds"] = stats["step_seconds"]
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit status: 0 done; 2 bad input or ``--adapter-path`` in use by a
    live run; 3 no step for ``--step-timeout`` s (:class:`Watchdog`); 4 a ring peer lost;
    5 an output could not be written; 128 + N stopped by signal N (130 Ctrl-C, 143
    SIGTERM). Each with one clear line (on rank 0 for 5 and 128 + N)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    handle_relayed_signals()
    args = build_parser().parse_args(argv)
    folder = Path(args.adapter_path)
    try:
        run(args)
    except (UsageError, DataError) as e:
        prefix = "" if dist.world_size() == 1 else f"[rank {dist.rank()}] "
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
    except WriteError as e:  # rank 0; the others stop with StoppedByRankZero
        print(f"error: {e}. {_what_is_kept(folder)}", file=sys.stderr, flush=True)
        return 5
    except StoppedByRankZero as e:
        return e.exit_status
    except Interrupted as e:
        if dist.rank() == 0:
            print(_interrupted_message(e, args, argv), file=sys.stderr, flush=True)
        return e.exit_status
    except KeyboardInterrupt:  # before training started (then StopAgreement handles it)
        print("Interrupted before training started; nothing to save.", file=sys.stderr,
              flush=True)
        return 128 + signal.SIGINT
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
        return 4
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
