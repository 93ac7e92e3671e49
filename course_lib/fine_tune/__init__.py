"""LoRA fine-tuning on one or many ranks, with the gradient averaging in plain sight.

Run it as one process, or as N ranks under ``mpirun -np N`` (MPI backend) or
``mlx.launch -n N`` (ring backend)::

    python -m course_lib.fine_tune                       # SmolLM2 and the sample data
    mpirun -np 2 python -m course_lib.fine_tune --adapter-path adapters/two

``--batch-size`` is the *global* batch: each of the N ranks takes ``batch/N`` of its rows.
Every step, each rank computes the loss gradient on its share, the gradients are averaged
with an all-reduce (:func:`course_lib.distributed.all_reduce_grads`), and every rank
applies the same Adam update. So 1 rank and N ranks with the same seed follow the same loss
curve up to float rounding: the course's central claim.

Token weighting: the loss is a mean over target tokens and ranks rarely hold the same number
of them. With ``--loss-weighting tokens`` (the default) each rank all-reduces its *sum* of
token gradients together with its token count and divides the one by the other, which gives
exactly the 1-rank gradient, in the same single all-reduce. ``--loss-weighting ranks`` is
the plain mean of per-rank means (what ``mlx_lm.lora`` does), which differs slightly on
uneven data.

Model loading, LoRA layers, datasets and the loss are ``mlx_lm``'s (``mlx_lm.load``,
``linear_to_lora_layers``, ``create_dataset``, ``default_loss``, which ``--loss scored``
computes with fewer logits); the batch order (sorted by length and resumable), the
validation, the loop and the averaging are ours.

Writes into ``--adapter-path`` (rank 0 only): ``adapters.safetensors`` and
``adapter_config.json`` (loadable by ``mlx_lm.load(model, adapter_path=...)`` and
``mlx_lm.generate --adapter-path``), ``NNNNNNN_adapters.safetensors`` checkpoints,
``metrics.jsonl`` (with one record per rank and report), ``loss.png`` and ``summary.json``;
with ``--report-to tensorboard``, TensorBoard event files in ``tensorboard/``
(``python -m course_lib.monitor ADAPTER_PATH`` serves them). Every file is written
atomically (:mod:`course_lib.atomic`), and one run at a time (a lock, ``.fine_tune.lock``).

The package, one job a module, in the order a run meets them: ``options`` (the command
line and each model's recipe), ``plan`` (the options resolved once into a frozen ``Plan``,
every check made), ``errors`` (``UsageError`` and the exit statuses), ``inputs`` (model,
data, adapters), ``sharding`` (``--sharding fsdp | tensor``: each rank holds 1/N of the
model), ``resume`` (a fresh start or a checkpoint continued exactly), ``batches`` (the
global batch order, each rank's share), ``loss`` (the loss, with logits for every position
or only scored ones), ``step`` (gradients, ``average_gradients``, the update), ``speed``
(streams, compilation and the phase timer: what the step has only for speed), ``loop``
(steps, validation, checkpoints), ``reporting`` (records, log lines, every rank's numbers
on rank 0), ``callbacks`` (``--report-to``), ``outputs`` (what rank 0 writes, and the
folder's lock), ``interrupts`` (Ctrl-C, SIGTERM and failed writes stop every rank
together), ``faults`` (dead and hung ranks; the faults tests cause are
:mod:`course_lib.fault_injection`'s) and ``cli`` (``run`` and ``main``).
"""

from __future__ import annotations

# Light on purpose: ``python -m course_lib.fine_tune`` imports this package before its
# __main__ switches BLAS (course_lib.blas), which must happen before MLX loads. So the
# names below are imported from their modules on first use (PEP 562).
_EXPORTS = {
    "options": ["build_parser", "RECIPES", "recipe_for", "apply_recipe", "DEFAULT_DATA",
                "DEFAULT_ADAPTER_PATH"],
    "plan": ["Plan", "resolve", "parse", "lora_parameters", "compile_by_default",
             "all_reduce_form", "streams_per_rank"],
    "errors": ["UsageError", "exit_status"],
    "inputs": ["Rows", "load_model", "load_split", "load_data", "add_adapters",
               "load_resume_weights", "check_ranks_agree"],
    "outputs": ["Outputs", "FolderLock", "FolderInUse", "METRICS_FILE", "SUMMARY_FILE",
                "PLOT_FILE", "ADAPTER_FILE", "CONFIG_FILE", "LOCK_FILE"],
    "loss": ["scored_loss", "loss_function", "output_layer"],
    "step": ["average_gradients", "token_sums_function", "make_step", "make_optimizer",
             "learning_rate_schedule"],
    "speed": ["PhaseTimer", "StreamSplit", "order_for_streams", "compile_step"],
    "batches": ["GlobalBatches", "pad_batch"],
    "faults": ["Watchdog", "peer_lost_message"],
    "interrupts": ["StopAgreement", "Interrupted", "StoppedByRankZero", "resume_command"],
    "loop": ["train", "validation_loss", "Start"],
    "reporting": ["Reporter", "Window", "gather_hosts", "log"],
    "callbacks": ["TensorBoardCallback", "reporting_callbacks", "check_report_to", "run_name"],
    "resume": ["run_settings", "resume_point", "start_from"],
    "cli": ["run", "main"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'course_lib.fine_tune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"course_lib.fine_tune.{_WHERE[name]}"), name)
