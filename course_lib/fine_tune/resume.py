"""Where a fine-tune starts: afresh, from a checkpoint it continues exactly (``--resume``,
or ``--resume-adapter-file`` with the checkpoint's state beside it), or from plain adapter
weights (``--resume-adapter-file``, ``mlx_lm``'s meaning). A checkpoint continues only
under the settings that decide the run's trajectory (:func:`run_settings`)."""

from __future__ import annotations

from pathlib import Path

from course_lib import checkpoint, models
from course_lib import distributed as dist
from course_lib.fine_tune.errors import UsageError
from course_lib.fine_tune.inputs import load_resume_weights
from course_lib.fine_tune.loop import Start
from course_lib.fine_tune.reporting import log


def run_settings(plan, model_id: str, num_layers: int, lora_parameters) -> dict:
    """What decides a run's trajectory; a checkpoint continues only under equal settings.

    The world size counts only where it changes the numbers: with ``--loss-weighting
    ranks`` (the mean of per-rank means depends on the split) or LoRA dropout (masks are
    drawn per rank). Otherwise N ranks compute the 1-rank update, so a checkpoint from 2
    ranks may continue on 1 or 4.
    """
    settings = {
        "model": models.identity(model_id), "fine_tune_type": plan.fine_tune_type,
        "num_layers": num_layers, "lora_parameters": lora_parameters,
        "batch_size": plan.batch_size, "seed": plan.seed,
        "grad_accumulation_steps": plan.grad_accumulation_steps,
        "max_seq_length": plan.max_seq_length, "mask_prompt": plan.mask_prompt,
        "learning_rate": plan.learning_rate, "warmup_steps": plan.warmup_steps,
        "loss_weighting": plan.loss_weighting,
        "train_data": checkpoint.fingerprint(plan.data / "train.jsonl"),
    }
    if plan.loss_weighting == "ranks" or (lora_parameters or {}).get("dropout", 0) > 0:
        settings["world_size"] = plan.world_size
    return settings


def resume_point(plan, group) -> tuple[Path, int] | None:
    """``(folder, iteration)`` of the checkpoint to continue, or None for a fresh start.

    ``--resume``: the newest complete checkpoint in ``--adapter-path``.
    ``--resume-adapter-file 000000N_adapters.safetensors`` with its state file beside it:
    that checkpoint. Decided on rank 0 (which holds the files) and sent to every rank, so
    all ranks agree, also on the error: :class:`UsageError` when ``--resume`` finds none.
    """
    decision = None
    if group.rank() == 0:
        if plan.resume:
            folder = Path(plan.adapter_path)
            it = checkpoint.latest(folder)
            decision = ({"folder": str(folder), "iteration": it} if it is not None else
                        {"error": f"--resume: no complete checkpoint in {folder} (a checkpoint "
                                  "is NNNNNNN_adapters.safetensors, NNNNNNN_optimizer."
                                  "safetensors and NNNNNNN_state.json)"})
        elif plan.resume_adapter_file:
            it = checkpoint.iteration_of(plan.resume_adapter_file)
            if it is not None:
                decision = {"folder": str(Path(plan.resume_adapter_file).parent),
                            "iteration": it}
    decision = dist.broadcast_json(decision, group)
    if decision is None:
        return None
    if "error" in decision:
        raise UsageError(decision["error"])
    return Path(decision["folder"]), decision["iteration"]


def start_from(plan, model, optimizer, sharding, settings: dict) -> Start:
    """The loop's :class:`~course_lib.fine_tune.loop.Start`, with ``model`` and
    ``optimizer`` (on every rank of ``sharding.group``) loaded from the checkpoint to
    continue or the adapter file to start from. Raises :class:`UsageError` when the
    checkpoint's settings differ from ``settings``, when it is already at ``--iters``, or
    when its arrays do not fit the model."""
    group = sharding.group
    resume = resume_point(plan, group)
    if resume is None:
        if plan.resume_adapter_file:  # a plain adapter file: mlx_lm's meaning, weights only
            load_resume_weights(model, plan.resume_adapter_file, sharding)
            log(f"Starting from the weights in {plan.resume_adapter_file} (no checkpoint "
                "state beside it: optimizer and data order start afresh)")
        return Start(settings=settings)
    folder, it = resume
    saved = checkpoint.read_state(folder, it, group)
    problems = checkpoint.mismatches(saved["settings"], settings)
    if problems:
        raise UsageError(f"cannot continue the checkpoint at iteration {it} in {folder} "
                         "exactly; these settings differ: " + "; ".join(problems))
    if plan.iters <= it:
        raise UsageError(f"--iters {plan.iters}: the checkpoint is already at iteration "
                         f"{it}; ask for more iterations to continue")
    try:
        checkpoint.restore(folder, it, model, optimizer, group, sharding)
    except ValueError as e:
        raise UsageError(f"cannot continue the checkpoint at iteration {it} in "
                         f"{folder}: {e}") from e
    log(f"Resuming from the checkpoint at iteration {it} in {folder}")
    return Start(iteration=it, data_order=saved["data_order"], settings=settings)
