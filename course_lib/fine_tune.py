"""LoRA fine-tuning on one or many ranks, with the gradient averaging in plain sight.

Run it as one process, or as N ranks under ``mpirun -np N`` (MPI backend) or
``mlx.launch -n N`` (ring backend)::

    python -m course_lib.fine_tune                       # default model and sample data
    mpirun -np 2 python -m course_lib.fine_tune --iters 200 --adapter-path adapters/two

``--batch-size`` is the *global* batch: each of the N ranks takes ``batch/N`` of its rows.
Every step, each rank computes the loss gradient on its share, the gradients are averaged
with an all-reduce (:func:`course_lib.distributed.all_reduce_grads`), and every rank
applies the same Adam update. So 1 rank and N ranks with the same seed follow the same loss
curve up to float rounding: the course's central claim.

Token weighting: the loss is a mean over target tokens and ranks rarely hold the same number
of them. With ``--loss-weighting tokens`` (the default) each rank all-reduces its *sum* of
token gradients together with its token count and divides the one by the other, which gives
exactly the 1-rank gradient, in the same single all-reduce. ``--loss-weighting ranks`` is the plain mean of per-rank means (what
``mlx_lm.lora`` does), which differs slightly on uneven data.

Model loading, LoRA layers, datasets, batching, the loss and validation are ``mlx_lm``'s
(``mlx_lm.load``, ``linear_to_lora_layers``, ``create_dataset``, ``iterate_batches``,
``default_loss``, ``evaluate``); the loop and the averaging are ours.

Writes into ``--adapter-path`` (rank 0 only): ``adapters.safetensors`` and
``adapter_config.json`` (loadable by ``mlx_lm.load(model, adapter_path=...)`` and
``mlx_lm.generate --adapter-path``), ``NNNNNNN_adapters.safetensors`` checkpoints,
``metrics.jsonl``, ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before MLX loads: see course_lib.blas
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from course_lib import checkpoint
from course_lib import distributed as dist
from course_lib.data import DataError, read_records

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data-sets" / "pirate"
DEFAULT_ADAPTER_PATH = "adapters/latest"

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


class UsageError(ValueError):
    """Bad options or inputs, found before anything is written."""


# ----------------------------------------------------------------------------- options

def _option_text(key: str, value) -> str:
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def build_parser() -> argparse.ArgumentParser:
    """The command line; option names and meanings follow ``mlx_lm.lora``."""
    p = argparse.ArgumentParser(
        prog="python -m course_lib.fine_tune",
        description="LoRA fine-tuning with explicit gradient averaging across ranks.",
        epilog="Options left out come from the model's recipe: " + "; ".join(
            f"{name}: " + ", ".join(_option_text(k, v) for k, v in r.items() if v is not None)
            for name, r in RECIPES.items()) + ".",
    )
    a = p.add_argument
    a("--model", default="smollm2",
      help="smollm2 (default: the course's SmolLM2-135M-Instruct; smollm2:4bit, "
      "smollm2:bfloat16 pick its weights), tiny (the 2M-parameter test model), a model "
      "folder or a Hugging Face id; named models are built on first use")
    a("--data", default=None, help="folder with train.jsonl and valid.jsonl "
      f"(default: {DEFAULT_DATA.relative_to(REPO_ROOT)} in the course repository)")
    a("--fine-tune-type", choices=["lora", "dora", "full"], default="lora")
    a("--num-layers", type=int, default=None,
      help="how many of the last layers get adapters; -1 for all (default: the recipe's)")
    a("--batch-size", type=int,
      help="GLOBAL batch in rows; each of N ranks takes batch/N (default: the recipe's, 8)")
    a("--iters", type=int, help="optimizer steps (default: the recipe's)")
    a("--val-batches", type=int,
      help="validation batches per evaluation; -1 for the whole set (default: the recipe's)")
    a("--learning-rate", type=float, help="Adam learning rate (default: the recipe's)")
    a("--steps-per-report", type=int, help="steps between train-loss reports")
    a("--steps-per-eval", type=int, help="steps between validations")
    a("--save-every", type=int, help="steps between checkpoints")
    a("--adapter-path", default=DEFAULT_ADAPTER_PATH,
      help=f"output folder (default {DEFAULT_ADAPTER_PATH})")
    a("--resume-adapter-file", help="start from these adapter weights (.safetensors); a "
      "checkpoint NNNNNNN_adapters.safetensors with its state file continues exactly")
    a("--resume", action="store_true",
      help="continue exactly from the newest complete checkpoint in --adapter-path")
    a("--step-timeout", type=float, default=300.0,
      help="exit when no step finishes for this many seconds (a hung peer rank); 0: never")
    a("--max-seq-length", type=int,
      help="longer rows are truncated (with a warning); filter them with "
      "`python -m course_lib.data --max-tokens` instead")
    a("--grad-checkpoint", action="store_true", help="recompute activations to save memory")
    a("--grad-accumulation-steps", type=int, default=1,
      help="micro-batches per optimizer step (default 1)")
    a("--seed", type=int, default=0, help="seed for LoRA init and data order")
    a("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
      help="train on the assistant turn only (default: the recipe's)")
    a("--lora-rank", type=int, help="rank r of the LoRA matrices (default: the recipe's)")
    a("--lora-alpha", type=float, default=None,
      help="LoRA alpha; sets scale = alpha / rank (Hu et al. 2021); exclusive with --lora-scale")
    a("--lora-scale", type=float, default=None,
      help="multiplier of the LoRA update, mlx_lm's 'scale' (default 20.0)")
    a("--lora-dropout", type=float, default=0.0,
      help="dropout on the LoRA input (default 0; >0 makes N-rank and 1-rank runs differ)")
    a("--backend", choices=dist.BACKENDS, default="auto",
      help="distributed backend; auto: mpi under mpirun, ring under mlx.launch")
    a("--loss-weighting", choices=["tokens", "ranks"], default="tokens",
      help="tokens: exact full-batch gradient; ranks: mean of per-rank means (mlx_lm's)")
    a("--all-reduce", choices=["auto", "plain", "bucketed"], default="auto",
      help="plain: all_reduce_grads, one all_sum per array; bucketed: "
      "mlx.nn.average_gradients, arrays concatenated into ~32 MiB buckets; auto (default): "
      "plain under MPI, bucketed under the ring backend (whose calls are slow to start)")
    a("--step-timing", action="store_true",
      help="time each step's phases (data, forward+backward, all-reduce, optimizer) with an "
      "evaluation between them; costs a little speed, feeds Amdahl's law in chapter 5")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="mx.compile the forward+backward pass and the optimizer update; default: on a "
      "GPU yes, on a CPU no (measured no faster there: benchmarks/README.md)")
    a("--no-progress", action="store_true", help="no progress bar, report lines only")
    return p


# The default recipe of each course model: what an option left out means. A folder or Hub
# id gets "other". Chosen by measurement on a 2-core laptop CPU (see README "Performance"
# and chapter 4): for smollm2 the style change is plain after a few dozen steps while the
# answers stay coherent, and the 2-rank default run stays within 5 minutes.
RECIPES = {
    "smollm2": {"num_layers": 8, "lora_rank": 8, "learning_rate": 5e-4, "iters": 24,
                "batch_size": 8, "max_seq_length": 512, "mask_prompt": True,
                "steps_per_report": 4, "steps_per_eval": 12, "val_batches": 2,
                "save_every": 12},
    "tiny": {"num_layers": -1, "lora_rank": 8, "learning_rate": 5e-4, "iters": 200,
             "batch_size": 8, "max_seq_length": 512, "mask_prompt": False,
             "steps_per_report": 10, "steps_per_eval": 50, "val_batches": -1,
             "save_every": 100},
    "other": {"num_layers": None, "lora_rank": 8, "learning_rate": 5e-4, "iters": 200,
              "batch_size": 8, "max_seq_length": 512, "mask_prompt": False,
              "steps_per_report": 10, "steps_per_eval": 50, "val_batches": -1,
              "save_every": 100},
}


def recipe_for(model: str) -> tuple[str, dict]:
    """``(name, recipe)`` of the default recipe for ``--model`` ``model``."""
    name = model.partition(":")[0]
    return (name, RECIPES[name]) if name in RECIPES and name != "other" else \
        ("other", RECIPES["other"])


def apply_recipe(args) -> str:
    """Fill every option left out (``None``) from the model's recipe (:data:`RECIPES`);
    ``other`` leaves ``num_layers`` to :func:`add_adapters` (16 or all, whichever is
    fewer). Returns the recipe's name. Idempotent."""
    name, recipe = recipe_for(args.model)
    for key, value in recipe.items():
        if getattr(args, key, None) is None and value is not None:
            setattr(args, key, value)
    return name


def resolve_lora_parameters(args) -> dict:
    """mlx_lm's ``lora_parameters`` dict from our options: rank, scale, dropout (+alpha)."""
    if args.lora_alpha is not None and args.lora_scale is not None:
        raise UsageError("give --lora-alpha or --lora-scale, not both (scale = alpha / rank)")
    if args.lora_rank < 1:
        raise UsageError(f"--lora-rank must be at least 1, got {args.lora_rank}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    scale = args.lora_scale if args.lora_scale is not None else (
        args.lora_alpha / args.lora_rank if args.lora_alpha is not None else 20.0)
    params = {"rank": args.lora_rank, "scale": scale, "dropout": args.lora_dropout}
    if args.lora_alpha is not None:
        params["alpha"] = args.lora_alpha
    return params


def check_options(args, world_size: int) -> None:
    """Raise :class:`UsageError` for option values that cannot run, before any work."""
    positive = ["iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every",
                "grad_accumulation_steps", "max_seq_length"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.val_batches == 0 or args.val_batches < -1:
        raise UsageError(f"--val-batches must be -1 (all) or at least 1, got {args.val_batches}")
    if args.batch_size < world_size:
        raise UsageError(f"--batch-size {args.batch_size} is smaller than the world size "
                         f"{world_size}: every rank needs at least one row")
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the world size "
                         f"{world_size}: the global batch is split evenly across ranks")
    if args.resume and args.resume_adapter_file:
        raise UsageError("give --resume or --resume-adapter-file, not both")
    if args.step_timeout < 0:
        raise UsageError(f"--step-timeout must be 0 (never) or positive, got {args.step_timeout}")
    if args.resume_adapter_file and not Path(args.resume_adapter_file).is_file():
        raise UsageError(f"--resume-adapter-file {args.resume_adapter_file}: no such file")
    resolve_lora_parameters(args)


# ----------------------------------------------------------------------------- inputs

def load_model(name: str):
    """``(model, tokenizer, model_path)``: ``mlx_lm.load`` of model ``name``.

    ``name`` is a course model (``smollm2[:DTYPE]``, ``tiny``: see :mod:`course_lib.models`,
    built on first use), a model folder, or a Hugging Face id. ``model_path`` is what
    ``mlx_lm.load`` loaded: the folder, or the Hub id. Raises :class:`UsageError` for a
    course model that cannot be built, a folder without ``config.json`` or weights, or a
    Hub id that cannot be fetched (offline).
    """
    from mlx_lm import load

    from course_lib.models import ModelError, resolve

    try:
        path = resolve(name, log=lambda m: dist.eprint0(m))
    except ModelError as e:
        raise UsageError(f"--model {name}: {e}") from e
    p = Path(path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise UsageError(f"--model {name}: no config.json in that folder")
        if not any(p.glob("*.safetensors")):
            raise UsageError(f"--model {name}: no *.safetensors weights in that folder")
    try:
        model, tokenizer = load(path)
    except Exception as e:  # mlx_lm/huggingface_hub raise many kinds
        raise UsageError(f"--model {name}: could not load it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return model, tokenizer, str(p.resolve()) if p.exists() else path


def load_split(path: Path, tokenizer, mask_prompt: bool, max_seq_length: int):
    """Tokenized rows ``[(token_ids, prompt_offset), ...]`` of one JSONL split.

    Rows are validated by :func:`course_lib.data.read_records` (errors name file and line),
    then tokenized by ``mlx_lm``'s dataset classes (chat template for chat records). Rows
    longer than ``max_seq_length`` are truncated; returns ``(rows, n_truncated)``.
    """
    from mlx_lm.tuner.datasets import create_dataset

    records = read_records(path).records
    config = types.SimpleNamespace(mask_prompt=mask_prompt)
    dataset = create_dataset(records, tokenizer, config)
    rows, truncated = [], 0
    for i in range(len(dataset)):
        tokens, offset = dataset.process(dataset[i])
        if len(tokens) > max_seq_length:
            tokens, truncated = tokens[:max_seq_length], truncated + 1
        rows.append((tokens, offset))
    return rows, truncated


def load_data(data_dir: Path, tokenizer, args):
    """``(train_rows, valid_rows)`` from ``data_dir``; ``valid_rows`` may be empty.

    Raises :class:`UsageError` when the folder or ``train.jsonl`` is missing or either split
    is smaller than the global batch.
    """
    if not data_dir.is_dir():
        raise UsageError(f"--data {data_dir}: no such folder (it should hold train.jsonl and "
                         "valid.jsonl; make them with `python -m course_lib.data RAW OUT_DIR`)")
    if not (data_dir / "train.jsonl").is_file():
        raise UsageError(f"--data {data_dir}: no train.jsonl in that folder")
    train, cut = load_split(data_dir / "train.jsonl", tokenizer, args.mask_prompt,
                            args.max_seq_length)
    valid, cut_v = [], 0
    if (data_dir / "valid.jsonl").is_file():
        valid, cut_v = load_split(data_dir / "valid.jsonl", tokenizer, args.mask_prompt,
                                  args.max_seq_length)
    else:
        dist.eprint0(f"warning: no {data_dir / 'valid.jsonl'}; training without validation")
    if cut or cut_v:
        dist.eprint0(f"warning: {cut + cut_v} rows are longer than --max-seq-length "
                     f"{args.max_seq_length} and were truncated; drop them instead with "
                     "`python -m course_lib.data ... --max-tokens`")
    for name, rows in (("train", train), ("valid", valid)):
        if rows and len(rows) < args.batch_size:
            raise UsageError(f"{data_dir / (name + '.jsonl')} has {len(rows)} rows, fewer than "
                             f"--batch-size {args.batch_size}")
    return train, valid


def add_adapters(model, args) -> tuple[int, dict | None]:
    """Freeze ``model`` and make its last ``num_layers`` layers trainable (LoRA/DoRA via
    ``mlx_lm``'s ``linear_to_lora_layers``, or the full layers). Returns
    ``(num_layers, lora_parameters)``; raises :class:`UsageError` for too many layers."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_model = len(model.layers)
    n = args.num_layers
    if n is None:
        n = min(16, n_model)
    elif n == -1:
        n = n_model
    if n < 1 or n > n_model:
        raise UsageError(f"--num-layers {args.num_layers}: the model has {n_model} layers "
                         "(use 1 to that, or -1 for all)")
    model.freeze()
    if args.fine_tune_type == "full":
        for layer in model.layers[-n:]:
            layer.unfreeze()
        return n, None
    params = resolve_lora_parameters(args)
    linear_to_lora_layers(model, n, params, use_dora=args.fine_tune_type == "dora")
    return n, params


def load_resume_weights(model, path: str) -> None:
    """Load adapter weights to continue from; raises :class:`UsageError` when they do not
    fit the model's trainable parameters (names or shapes)."""
    weights = mx.load(path)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    bad = [f"{k} {tuple(v.shape)}" for k, v in weights.items()
           if k not in trainable or trainable[k].shape != v.shape]
    if bad:
        raise UsageError(f"--resume-adapter-file {path} does not fit this model and LoRA "
                         f"setting: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    model.load_weights(list(weights.items()), strict=False)


# ----------------------------------------------------------------------------- outputs

class Outputs:
    """Everything the run writes. On ranks other than 0 every method does nothing."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled = Path(folder), enabled
        self._metrics = None

    def start(self, config: dict, resume_from: int | None = None) -> list[dict]:
        """Create the folder, write ``adapter_config.json`` and open ``metrics.jsonl``.

        When resuming from iteration ``resume_from``, keep the metric records up to it (the
        steps after it will run again) and return them; otherwise start the file afresh.
        """
        if not self.enabled:
            return []
        self.folder.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json_atomic(self.folder / CONFIG_FILE, config)
        kept: list[dict] = []
        metrics = self.folder / METRICS_FILE
        if resume_from is not None and metrics.exists():
            from course_lib.plotting import read_metrics

            kept = [r for r in read_metrics(metrics) if r["iteration"] <= resume_from]
            tmp = metrics.with_name(f".{METRICS_FILE}.tmp{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, metrics)
        self._metrics = open(metrics, "a" if resume_from is not None else "w")
        return kept

    def metric(self, record: dict) -> None:
        if self._metrics:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def adapters(self, model) -> None:
        """Save the trainable weights as ``adapters.safetensors``."""
        if self.enabled:
            weights = dict(tree_flatten(model.trainable_parameters()))
            checkpoint.save_safetensors_atomic(self.folder / ADAPTER_FILE, weights)

    def checkpoint(self, iteration: int, model, optimizer, state: dict) -> Path | None:
        """Write the checkpoint at ``iteration`` (see :mod:`course_lib.checkpoint`) and
        update ``adapters.safetensors``; returns the checkpoint's adapter file."""
        if not self.enabled:
            return None
        saved = checkpoint.save(self.folder, iteration, model, optimizer, state)
        self.adapters(model)
        return saved

    def finish(self, summary: dict, history: list[dict]) -> None:
        if not self.enabled:
            return
        if self._metrics:
            self._metrics.close()
        checkpoint.write_json_atomic(self.folder / SUMMARY_FILE, summary)
        from course_lib.plotting import plot_loss_curves

        n = summary["world_size"]
        label = f"{n} rank{'s' if n > 1 else ''}"
        plot_loss_curves({label: history}, self.folder / PLOT_FILE,
                         title=f"Fine-tune, {label}, global batch {summary['global_batch']}")


# ----------------------------------------------------------------------------- training

class PhaseTimer:
    """Seconds per phase of a step, summed over a report window.

    ``lap(name, *arrays)`` evaluates ``arrays`` (forcing MLX's lazy graph up to that point)
    and charges the time since the previous lap to ``name``. Disabled, it does nothing, so
    the step stays one lazy graph evaluated once.
    """

    # "wait": a barrier before the all-reduce, so that waiting for a slower rank (one with
    # longer rows, or a busier core) is not charged to the communication. Zero at 1 rank.
    PHASES = ("data", "forward_backward", "wait", "all_reduce", "optimizer")

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.reset()

    def reset(self):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._last = time.perf_counter()

    def start(self):
        self._last = time.perf_counter()

    def lap(self, name: str, *arrays):
        if not self.enabled:
            return
        mx.eval(*arrays)
        now = time.perf_counter()
        self.seconds[name] += now - self._last
        self._last = now


# Measured on the course's 2-core machine (benchmarks/all_reduce.py, MLX 0.32; see
# benchmarks/README.md): one small all_sum costs ~20 us under MPI, while under the ring
# backend single calls often take 10-20 ms. The default model's LoRA tree has 56 arrays:
# averaged plain it took ~1.4 ms under MPI and 38-65 ms under the ring; bucketed, ~1.7 ms
# and 5-9 ms.
def resolve_all_reduce(choice: str, group) -> str:
    """``plain`` or ``bucketed`` for ``--all-reduce`` ``choice``; ``auto`` picks plain (the
    course's all_reduce_grads) where a call is cheap (MPI, one rank) and bucketed where
    each call pays a large fixed latency (the ring backend)."""
    if choice != "auto":
        return choice
    return "bucketed" if dist.detect_backend() == "ring" and group.size() > 1 else "plain"


def resolve_compile(choice: bool | None) -> bool:
    """Whether to ``mx.compile`` the step for ``--compile``/``--no-compile`` (``choice``) or
    neither (``None``): on a GPU yes (Metal kernels fuse and launch less often, which is why
    mlx_lm compiles its step); on a CPU no, since benchmarks/step_anatomy.py measured the
    compiled step no faster there (0.84-0.92x at 1 rank, 0.97-1.08x at 2, two runs on a
    2-core x86 machine; benchmarks/README.md)."""
    if choice is not None:
        return choice
    return mx.default_device() == mx.gpu


def make_step(model, optimizer, args, group, timer: PhaseTimer):
    """The training step: gradients on this rank's share, all-reduce, optimizer update.

    Returns ``step(micro_batches) -> (loss_sum, ntoks)`` where ``micro_batches`` is a list
    of ``(batch, lengths)`` (one per gradient-accumulation step) and the results are this
    rank's summed token losses and target-token count (lazy ``mx.array`` scalars).
    ``timer`` splits the step's time into phases when enabled.

    When :func:`resolve_compile` says so, the forward+backward pass and the optimizer
    update are each an ``mx.compile``d function (as ``mlx_lm``'s trainer compiles its
    step): MLX fuses their many small element-wise operations into fewer kernels, traced
    once per batch shape. The all-reduce between them stays plain Python, so the averaging
    the course teaches is the code that runs, and ``--step-timing`` still times each phase
    apart.
    """
    from mlx_lm.tuner.trainer import default_loss

    loss_and_grad = nn.value_and_grad(model, default_loss)
    if resolve_all_reduce(args.all_reduce, group) == "plain":
        average = lambda g: dist.all_reduce_grads(g, group)  # noqa: E731
    else:
        average = lambda g: nn.average_gradients(g, group=group)  # noqa: E731

    def token_sums(batch, lengths):
        """This micro-batch's summed token loss, token count and token-summed gradients
        (default_loss returns means: multiplying by the count undoes that, so
        micro-batches and ranks add up)."""
        (loss, n), grads = loss_and_grad(model, batch, lengths)
        return loss * n, n, tree_map(lambda g: g * n, grads)

    def update(grads):
        optimizer.update(model, grads)

    if resolve_compile(args.compile):
        # Parameters, optimizer moments and the dropout RNG are inputs and outputs of the
        # compiled graphs rather than constants baked into them. The model is an output of
        # token_sums too: value_and_grad puts its traced parameters into the model.
        token_sums = mx.compile(token_sums, inputs=[model.state, mx.random.state],
                                outputs=[model.state, mx.random.state])
        update = mx.compile(update, inputs=[model.state, optimizer.state],
                            outputs=[model.state, optimizer.state])

    def step(micro_batches):
        grad_sum, loss_sum, ntoks = None, mx.array(0.0), mx.array(0)
        for batch, lengths in micro_batches:
            loss, n, grads = token_sums(batch, lengths)
            grad_sum = grads if grad_sum is None else tree_map(mx.add, grad_sum, grads)
            loss_sum, ntoks = loss_sum + loss, ntoks + n
        timer.lap("forward_backward", grad_sum, loss_sum, ntoks)
        if timer.enabled and group.size() > 1:
            dist.barrier(group)
            timer.lap("wait")
        if args.loss_weighting == "tokens":
            # Average the token-summed gradients and the token counts in one all-reduce;
            # mean(sum of gradients) / mean(token count) = (all token gradients) / (all
            # tokens): exactly the gradient one rank would compute on the whole batch.
            reduced = average({"grads": grad_sum, "ntoks": ntoks.astype(mx.float32)})
            grads = tree_map(lambda g: g / reduced["ntoks"], reduced["grads"])
        else:
            # mlx_lm's way: this rank's mean, then the mean of the means.
            grads = average(tree_map(lambda g: g / ntoks, grad_sum))
        # Every rank now holds the same gradient.
        timer.lap("all_reduce", grads)
        update(grads)
        timer.lap("optimizer", model.parameters(), optimizer.state)
        return loss_sum, ntoks

    return step


class GlobalBatches:
    """The order of global batches: the same for every world size, and resumable.

    As in ``mlx_lm``'s ``iterate_batches``: rows are sorted by token length and cut into
    global batches of ``batch_size`` neighbours (little padding; the last partial batch is
    dropped), and each epoch visits the batches in a random order. Here that order comes
    from a seeded ``numpy.random.Generator`` of our own, whose state :meth:`state` returns
    for a checkpoint, so a resumed run sees exactly the batches an uninterrupted one would.
    Rank r of N takes rows r, r+N, r+2N... of each batch (:meth:`next`).
    """

    def __init__(self, rows: list, batch_size: int, seed: int):
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        self.batches = [order[i:i + batch_size]
                        for i in range(0, len(order) - batch_size + 1, batch_size)]
        self.rows = rows
        self.rng = np.random.default_rng(seed)
        self.epoch_order: list[int] = []
        self.position = 0

    def next(self, rank: int, size: int, max_seq_length: int):
        """This rank's share of the next global batch, padded: ``(tokens, lengths)``."""
        if self.position >= len(self.epoch_order):
            self.epoch_order = self.rng.permutation(len(self.batches)).tolist()
            self.position = 0
        batch = self.batches[self.epoch_order[self.position]]
        self.position += 1
        return pad_batch([self.rows[i] for i in batch[rank::size]], max_seq_length)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "epoch_order": self.epoch_order,
                "position": self.position}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch_order, self.position = state["epoch_order"], state["position"]


def pad_batch(rows: list, max_seq_length: int):
    """``(tokens (B, L) int32, lengths (B, 2) [prompt offset, length])`` for ``default_loss``.

    Padded with zeros to one more than a multiple of 32 (``mlx_lm``'s rule: few distinct
    shapes), at most ``max_seq_length``.
    """
    lengths = [min(len(tokens), max_seq_length) for tokens, _ in rows]
    width = min(1 + 32 * math.ceil(max(lengths) / 32), max_seq_length)
    arr = np.zeros((len(rows), width), np.int32)
    for j, ((tokens, _), n) in enumerate(zip(rows, lengths)):
        arr[j, :n] = tokens[:n]
    return mx.array(arr), mx.array([[offset, n] for (_, offset), n in zip(rows, lengths)])


def validation_loss(model, valid_rows, args) -> float:
    """Mean token loss over ``--val-batches`` global batches of the validation rows,
    summed over all ranks (``mlx_lm``'s ``evaluate``). The same batches every time (numpy's
    global seed is set first), so evaluations are comparable. Leaves the model training."""
    from mlx_lm.tuner.trainer import evaluate

    np.random.seed(args.seed)
    loss = evaluate(model, valid_rows, batch_size=args.batch_size,
                    num_batches=args.val_batches, max_seq_length=args.max_seq_length)
    model.train()
    return loss


class PeerLost(RuntimeError):
    """Another rank stopped answering in the middle of a collective operation."""


def _peer_lost_message(group, backend: str, error: Exception | str) -> str:
    rank, size = group.rank(), group.size()
    if size == 2:
        who = f"rank {1 - rank}"
    else:
        who = f"rank {(rank - 1) % size} or rank {(rank + 1) % size} (its neighbours in the ring)"
    return (f"rank {rank}: lost {who} during an all-reduce ({backend} backend: {error}). "
            "That rank died or its machine left the network.")


class Watchdog:
    """Exits this rank when a step takes far too long: a peer that hangs (a closed laptop, a
    stopped process) blocks an all-reduce forever, and neither MPI nor the ring times out.

    ``beat()`` after each step and evaluation; after ``timeout`` seconds without one it
    prints a message and ends the process with exit status 3. ``timeout`` 0 disables it.
    """

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank, self.last = timeout, rank, time.monotonic()
        if timeout > 0:
            import threading

            threading.Thread(target=self._watch, daemon=True).start()

    def beat(self):
        self.last = time.monotonic()

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            if time.monotonic() - self.last > self.timeout:
                print(f"rank {self.rank}: no step finished for {self.timeout:.0f} s "
                      "(--step-timeout); another rank is probably stopped or unreachable. "
                      "Exiting; continue later with --resume.", file=sys.stderr, flush=True)
                os._exit(3)


def _maybe_fault(rank: int, iteration: int) -> None:
    """Test hook: ``COURSE_LIB_FAULT=kill-rank-R@N`` SIGKILLs rank R when step N starts
    (a crash); ``stop-rank-R@N`` SIGSTOPs it (a closed laptop: alive but silent)."""
    import signal

    fault = os.environ.get("COURSE_LIB_FAULT")
    if fault == f"kill-rank-{rank}@{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"stop-rank-{rank}@{iteration}":
        os.kill(os.getpid(), signal.SIGSTOP)


def train(model, optimizer, train_rows, valid_rows, args, group, outputs: Outputs, log,
          settings: dict, start: int = 0, data_state: dict | None = None,
          history: list[dict] | None = None):
    """The loop: optimizer steps ``start + 1`` to ``args.iters``, with reports, validation
    and checkpoints (which record ``settings`` and the data order).

    Returns ``(history, stats)``: the metric records (earlier ones first, when resuming)
    and totals (seconds of training, tokens).
    """
    from mlx_lm.tuner.trainer import grad_checkpoint

    size, rank = group.size(), group.rank()
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    timer = PhaseTimer(args.step_timing)
    step = make_step(model, optimizer, args, group, timer)
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
        loss = validation_loss(model, valid_rows, args)
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
        _maybe_fault(rank, it)
        tic = time.perf_counter()
        timer.start()
        # Dropout draws from MLX's generator: reseed per step so masks depend only on the
        # seed and the step, and a resumed run draws the ones an uninterrupted run would.
        mx.random.seed(args.seed * 1_000_003 + it)
        micro = [batches.next(rank, size, args.max_seq_length)
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
            loss, toks = totals[0].item() / totals[1].item(), int(totals[1].item())
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
            saved = outputs.checkpoint(it, model, optimizer,
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


# ----------------------------------------------------------------------------- main

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
    model, tokenizer, model_id = load_model(args.model)
    train_rows, valid_rows = load_data(data_dir, tokenizer, args)
    num_layers, lora_parameters = add_adapters(model, args)
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
        checkpoint.restore(folder, start, model, optimizer, group)
        data_state = saved["data_order"]
        log(f"Resuming from the checkpoint at iteration {start} in {folder}")
    elif args.resume_adapter_file:  # a plain adapter file: mlx_lm's meaning, weights only
        load_resume_weights(model, args.resume_adapter_file)
        log(f"Starting from the weights in {args.resume_adapter_file} (no checkpoint state "
            "beside it: optimizer and data order start afresh)")

    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"{backend} backend, world size {size}: global batch {args.batch_size}, "
        f"{args.batch_size // size} rows per rank; {len(train_rows)} train / "
        f"{len(valid_rows)} valid rows")
    log(f"Recipe {recipe}: {args.iters} steps, learning rate {args.learning_rate:g}, "
        f"LoRA rank {args.lora_rank}, mask prompt {'on' if args.mask_prompt else 'off'}")
    log(f"Trainable parameters: {100 * n_train / n_total:.3f}% "
        f"({n_train / 1e6:.3f}M/{n_total / 1e6:.3f}M), {args.fine_tune_type}, "
        f"{num_layers} layers")

    config = dict(vars(args))
    config.update(model=model_id, model_name=args.model,
                  data=str(args.data) if args.data else "default sample (data-sets/pirate)",
                  num_layers=num_layers, lora_parameters=lora_parameters,
                  world_size=size, backend=backend)
    outputs = Outputs(Path(args.adapter_path), enabled=rank == 0)
    kept = outputs.start(config, resume_from=start if resume is not None else None)
    history, stats = train(model, optimizer, train_rows, valid_rows, args, group, outputs, log,
                           settings, start=start, data_state=data_state, history=kept)
    outputs.adapters(model)

    train_losses = [h["loss"] for h in history if h["split"] == "train"]
    valid_losses = [h["loss"] for h in history if h["split"] == "valid"]
    summary = {
        "backend": backend,
        "world_size": size,
        "iterations": args.iters,
        "global_batch": args.batch_size,
        "per_rank_batch": args.batch_size // size,
        "loss_weighting": args.loss_weighting,
        "all_reduce": resolve_all_reduce(args.all_reduce, group),
        "compiled": resolve_compile(args.compile),
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
        print(f"error: {_peer_lost_message(dist.world(), 'ring', e)} Stopping; {kept}.",
              file=sys.stderr, flush=True)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
