"""``python -m course_lib.fine_tune``: read the options, start the world, load, resume or
start, train, write the summary; errors as one clear line and an exit status."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from course_lib import checkpoint
from course_lib import distributed as dist
from course_lib.data import DataError
from course_lib.fine_tune.faults import peer_lost_message
from course_lib.fine_tune.inputs import add_adapters, load_data, load_model, load_resume_weights
from course_lib.fine_tune.loop import train
from course_lib.fine_tune.options import (DEFAULT_DATA, UsageError, apply_recipe, build_parser,
                                          check_options)
from course_lib.fine_tune.outputs import Outputs
from course_lib.fine_tune.sharding import check_sharding, shard_model
from course_lib.fine_tune.step import resolve_all_reduce, resolve_compile


def run_settings(args, model_id: str, num_layers: int, lora_parameters, data_dir: Path,
                 world_size: int) -> dict:
    """What decides a run's trajectory; a checkpoint continues only under equal settings.

    The world size counts only where it changes the numbers: with ``--loss-weighting
    ranks`` (the mean of per-rank means depends on the split) or LoRA dropout (masks are
    drawn per rank). Otherwise N ranks compute the 1-rank update, so a checkpoint from 2
    ranks may continue on 1 or 4.
    """
    settings = {
        "model": model_id, "fine_tune_type": args.fine_tune_type, "num_layers": num_layers,
        "lora_parameters": lora_parameters, "batch_size": args.batch_size, "seed": args.seed,
        "grad_accumulation_steps": args.grad_accumulation_steps,
        "max_seq_length": args.max_seq_length, "mask_prompt": args.mask_prompt,
        "learning_rate": args.learning_rate, "loss_weighting": args.loss_weighting,
        "train_data": checkpoint.fingerprint(data_dir / "train.jsonl"),
    }
    if args.loss_weighting == "ranks" or (lora_parameters or {}).get("dropout", 0) > 0:
        settings["world_size"] = world_size
    return settings


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
    anything is written into ``--adapter-path``.
    """
    t_start = time.perf_counter()
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
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    model, tokenizer, model_id = load_model(args.model, lazy=args.sharding != "none")
    train_rows, valid_rows = load_data(data_dir, tokenizer, args)
    num_layers, lora_parameters = add_adapters(model, args)
    sharding = shard_model(model, args, group)  # before any weight is read, when lazy
    settings = run_settings(args, model_id, num_layers, lora_parameters, data_dir, size)
    optimizer = optim.Adam(learning_rate=args.learning_rate)
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
        checkpoint.restore(folder, start, model, optimizer, group, sharding)
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
    kept = outputs.start(config, resume_from=start if resume is not None else None)
    history, stats = train(model, optimizer, train_rows, valid_rows, args, group, outputs, log,
                           settings, start=start, data_state=data_state, history=kept,
                           sharding=sharding)
    peaks = mx.array([mx.get_peak_memory() / 1e9])  # each rank's, before the final save
    peaks = (mx.distributed.all_gather(peaks, group=group) if size > 1 else peaks).tolist()
    outputs.adapters(sharding.whole(model)[0])

    train_losses = [h["loss"] for h in history if h["split"] == "train"]
    valid_losses = [h["loss"] for h in history if h["split"] == "valid"]
    summary = {
        "backend": backend,
        "world_size": size,
        "iterations": args.iters,
        "global_batch": args.batch_size,
        "per_rank_batch": args.batch_size // sharding.data_share()[1],
        "loss_weighting": args.loss_weighting,
        "all_reduce": resolve_all_reduce(args.all_reduce, group),
        "compiled": resolve_compile(args.compile),
        "loss": "all" if resolve_compile(args.compile) else args.loss,
        "seconds": time.perf_counter() - t_start,
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
        "resumed_from": start if resume is not None else None,
        "sharding": held,
        "peak_memory_gb_per_rank": peaks,
        "collective_bytes_per_step": sharding.traffic.summary(args.iters - start),
    }
    if "step_seconds" in stats:  # mean seconds per step in each phase (rank 0's clock)
        summary["step_seconds"] = stats["step_seconds"]
    outputs.finish(summary, history)
    log(f"Done in {summary['seconds']:.1f} s ({summary['tokens_per_second']:.0f} tokens/s "
        f"training). Adapters, loss.png, metrics.jsonl and summary.json are in "
        f"{args.adapter_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 0 on success, 2 on bad input (with one clear line)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, DataError) as e:
        prefix = "" if dist.world_size() == 1 else f"[rank {dist.rank()}] "
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        # The ring backend raises when a peer's connection drops (a rank died); MPI instead
        # has mpirun end every rank and name the dead one itself.
        if "[ring]" not in str(e):
            raise
        last = checkpoint.latest(Path(args.adapter_path))
        kept = (f"the last complete checkpoint (iteration {last}) is intact: continue with "
                "--resume" if last is not None else "no checkpoint was written yet")
        print(f"error: {peer_lost_message(dist.world(), 'ring', e)} Stopping; {kept}.",
              file=sys.stderr, flush=True)
        return 4
    return 0
