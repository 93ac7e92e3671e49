"""The command line of the fine-tune: options (named as ``mlx_lm.lora`` names them) and the
default recipe of each course model. :mod:`course_lib.fine_tune.plan` resolves them into
the run's plan and checks them."""

from __future__ import annotations

import argparse
from pathlib import Path

from course_lib import distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT / "data-sets" / "pirate"
DEFAULT_ADAPTER_PATH = "adapters/latest"


def _option_text(key: str, value) -> str:
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _streams(text: str):
    """``--streams``: ``auto`` or a whole number of at least 1."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be auto or a whole number >= 1, got {text!r}")
    return n


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
    a("--warmup-steps", type=int, default=0,
      help="raise the learning rate linearly from 0 over this many steps, then hold it "
      "(Goyal et al. 2017; default 0: none)")
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
      help="distributed backend; auto: mpi under mpirun, ring under mlx.launch, nccl under "
      "mlx.launch --backend nccl (NVIDIA GPUs)")
    a("--loss-weighting", choices=["tokens", "ranks"], default="tokens",
      help="tokens: exact full-batch gradient; ranks: mean of per-rank means (mlx_lm's)")
    a("--loss", choices=["scored", "all"], default="scored",
      help="scored (default): logits only where a target token is scored; all: mlx_lm's "
      "default_loss, logits at every position. The same loss; scored skips output-layer "
      "work on prompts and padding (course_lib/fine_tune/loss.py)")
    a("--all-reduce", choices=["auto", "plain", "bucketed"], default="auto",
      help="plain: all_reduce_grads, one all_sum per array; bucketed: "
      "mlx.nn.average_gradients, arrays concatenated into ~32 MiB buckets; auto (default): "
      "plain under MPI, bucketed under the ring backend (whose calls are slow to start)")
    a("--step-timing", action="store_true",
      help="time each step's phases (data, forward+backward, all-reduce, optimizer) with an "
      "evaluation between them; costs a little speed, feeds Amdahl's law in chapter 5")
    a("--rank-timing", action=argparse.BooleanOptionalAction, default=True,
      help="time each rank's forward+backward and its wait at the all-reduce (an "
      "evaluation after each, no barrier) for the per-rank records and the dashboard "
      "(default on; measured cost: benchmarks/README.md)")
    a("--report-to", default=None,
      help="also log the metrics to tensorboard (event files in ADAPTER_PATH/tensorboard; "
      "watch with python -m course_lib.monitor ADAPTER_PATH), wandb or swanlab; comma "
      "separated, as mlx_lm lora --report-to")
    a("--project-name", default=None,
      help="project name for wandb/swanlab, as mlx_lm lora --project-name")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="mx.compile the forward+backward pass and the optimizer update; default: on a "
      "GPU yes, on a CPU no (measured no faster there: benchmarks/README.md)")
    a("--streams", type=_streams, default="auto",
      help="split this rank's rows of each batch across N MLX streams computed at once "
      "and add their gradients (exactly as micro-batches). On a CPU a stream is one "
      "thread, and MLX's element-wise kernels run on their stream's thread only, so one "
      "stream leaves the other cores idle outside the matmuls. auto (default): the cores "
      "per rank on a CPU (its OpenBLAS threads), 1 on a GPU, for --fine-tune-type full (a "
      "whole gradient per stream) or under --sharding (measured: benchmarks/README.md)")
    a("--sharding", choices=["none", "fsdp", "tensor"], default="none",
      help="none (default): data parallelism, every rank holds the whole model; fsdp: each "
      "rank holds 1/N of every parameter, gradient and Adam moment (ZeRO-3), gathering a "
      "block's parameters when it runs; tensor: each rank holds 1/N of every attention "
      "and MLP matrix and computes the whole batch (Megatron-LM). See "
      "course_lib/fine_tune/sharding.py and chapter 6")
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
    fewer). Returns the recipe's name. Edits ``args``; idempotent."""
    name, recipe = recipe_for(args.model)
    for key, value in recipe.items():
        if getattr(args, key, None) is None and value is not None:
            setattr(args, key, value)
    return name
