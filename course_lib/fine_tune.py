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
of them. With ``--loss-weighting tokens`` (the default) each rank's gradient is weighted by
its share of the global token count before the average, which gives exactly the 1-rank
gradient. ``--loss-weighting ranks`` is the plain mean of per-rank means (what
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

def build_parser() -> argparse.ArgumentParser:
    """The command line; option names and meanings follow ``mlx_lm.lora``."""
    p = argparse.ArgumentParser(
        prog="python -m course_lib.fine_tune",
        description="LoRA fine-tuning with explicit gradient averaging across ranks.",
    )
    a = p.add_argument
    a("--model", help="model folder or Hugging Face id (default: the course's tiny model, "
      "built on first use)")
    a("--data", default=None, help="folder with train.jsonl and valid.jsonl "
      f"(default: {DEFAULT_DATA.relative_to(REPO_ROOT)} in the course repository)")
    a("--fine-tune-type", choices=["lora", "dora", "full"], default="lora")
    a("--num-layers", type=int, default=None,
      help="how many of the last layers get adapters; -1 for all (default: 16 or all, "
      "whichever is fewer)")
    a("--batch-size", type=int, default=8,
      help="GLOBAL batch in rows; each of N ranks takes batch/N (default 8)")
    a("--iters", type=int, default=200, help="optimizer steps (default 200)")
    a("--val-batches", type=int, default=-1,
      help="validation batches per evaluation; -1 for the whole set (default)")
    a("--learning-rate", type=float, default=5e-4, help="Adam learning rate (default 5e-4)")
    a("--steps-per-report", type=int, default=10, help="steps between train-loss reports")
    a("--steps-per-eval", type=int, default=50, help="steps between validations")
    a("--save-every", type=int, default=100, help="steps between checkpoints")
    a("--adapter-path", default=DEFAULT_ADAPTER_PATH,
      help=f"output folder (default {DEFAULT_ADAPTER_PATH})")
    a("--resume-adapter-file", help="start from these adapter weights (.safetensors)")
    a("--max-seq-length", type=int, default=512,
      help="longer rows are truncated (with a warning); filter them with "
      "`python -m course_lib.data --max-tokens` instead")
    a("--grad-checkpoint", action="store_true", help="recompute activations to save memory")
    a("--grad-accumulation-steps", type=int, default=1,
      help="micro-batches per optimizer step (default 1)")
    a("--seed", type=int, default=0, help="seed for LoRA init and data order")
    a("--mask-prompt", action="store_true", help="train on the assistant turn only")
    a("--lora-rank", type=int, default=8, help="rank r of the LoRA matrices (default 8)")
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
    a("--all-reduce", choices=["plain", "bucketed"], default="plain",
      help="plain: all_reduce_grads, one all_sum per array; bucketed: "
      "mlx.nn.average_gradients, arrays concatenated into ~32 MiB buckets")
    a("--step-timing", action="store_true",
      help="time each step's phases (data, forward+backward, all-reduce, optimizer) with an "
      "evaluation between them; costs a little speed, feeds Amdahl's law in chapter 5")
    a("--no-progress", action="store_true", help="no progress bar, report lines only")
    return p


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
    if args.resume_adapter_file and not Path(args.resume_adapter_file).is_file():
        raise UsageError(f"--resume-adapter-file {args.resume_adapter_file}: no such file")
    resolve_lora_parameters(args)


# ----------------------------------------------------------------------------- inputs

def load_model(name: str | None):
    """``(model, tokenizer, model_id)``: ``mlx_lm.load`` of ``name`` or the default model.

    Raises :class:`UsageError` for a folder without ``config.json`` or weights, or a Hub id
    that cannot be fetched (offline).
    """
    from mlx_lm import load

    if name is None:
        from course_lib.tiny_model import ensure_default_model

        path = ensure_default_model(log=lambda m: dist.eprint0(m))
        model, tokenizer = load(str(path))
        return model, tokenizer, f"course_lib default ({path.name})"
    p = Path(name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise UsageError(f"--model {name}: no config.json in that folder")
        if not any(p.glob("*.safetensors")):
            raise UsageError(f"--model {name}: no *.safetensors weights in that folder")
    try:
        model, tokenizer = load(name)
    except Exception as e:  # mlx_lm/huggingface_hub raise many kinds
        raise UsageError(f"--model {name}: could not load it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return model, tokenizer, name


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

def save_safetensors_atomic(path: Path, weights: dict) -> None:
    """``mx.save_safetensors`` into a temporary file, then rename over ``path``."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.safetensors")
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    """JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class Outputs:
    """Everything the run writes. On ranks other than 0 every method does nothing."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled = Path(folder), enabled
        self._metrics = None

    def start(self, config: dict) -> None:
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / CONFIG_FILE, config)
        self._metrics = open(self.folder / METRICS_FILE, "w")

    def metric(self, record: dict) -> None:
        if self._metrics:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def adapters(self, model, iteration: int | None = None) -> Path | None:
        """Save the trainable weights as ``adapters.safetensors`` and, given an iteration,
        also as checkpoint ``NNNNNNN_adapters.safetensors``; returns the checkpoint path."""
        if not self.enabled:
            return None
        weights = dict(tree_flatten(model.trainable_parameters()))
        save_safetensors_atomic(self.folder / ADAPTER_FILE, weights)
        if iteration is None:
            return None
        checkpoint = self.folder / f"{iteration:07d}_{ADAPTER_FILE}"
        save_safetensors_atomic(checkpoint, weights)
        return checkpoint

    def finish(self, summary: dict, history: list[dict]) -> None:
        if not self.enabled:
            return
        if self._metrics:
            self._metrics.close()
        write_json_atomic(self.folder / SUMMARY_FILE, summary)
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

    PHASES = ("data", "forward_backward", "all_reduce", "optimizer")

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


def make_step(model, optimizer, args, group, timer: PhaseTimer):
    """The training step: gradients on this rank's share, all-reduce, optimizer update.

    Returns ``step(micro_batches) -> (loss_sum, ntoks)`` where ``micro_batches`` is a list
    of ``(batch, lengths)`` (one per gradient-accumulation step) and the results are this
    rank's summed token losses and target-token count (lazy ``mx.array`` scalars).
    ``timer`` splits the step's time into phases when enabled.
    """
    from mlx_lm.tuner.trainer import default_loss

    size = group.size()
    loss_and_grad = nn.value_and_grad(model, default_loss)
    if args.all_reduce == "plain":
        average = lambda g: dist.all_reduce_grads(g, group)  # noqa: E731
    else:
        average = lambda g: nn.average_gradients(g, group=group)  # noqa: E731

    def step(micro_batches):
        grad_sum, loss_sum, ntoks = None, mx.array(0.0), mx.array(0)
        for batch, lengths in micro_batches:
            (loss, n), grads = loss_and_grad(model, batch, lengths)
            # Undo the per-micro-batch mean: sum over tokens, so micro-batches add up.
            grads = tree_map(lambda g, n=n: g * n, grads)
            grad_sum = grads if grad_sum is None else tree_map(mx.add, grad_sum, grads)
            loss_sum, ntoks = loss_sum + loss * n, ntoks + n
        timer.lap("forward_backward", grad_sum, loss_sum, ntoks)
        if args.loss_weighting == "tokens":
            # Each rank's token sum, times N over the global token count: the mean over
            # ranks of these is sum(all token gradients) / all tokens = the 1-rank gradient.
            global_ntoks = dist.all_sum(ntoks, group)
            grads = tree_map(lambda g: g * (size / global_ntoks), grad_sum)
        else:
            # mlx_lm's way: this rank's mean, then the mean of the means.
            grads = tree_map(lambda g: g / ntoks, grad_sum)
        grads = average(grads)  # the all-reduce: every rank now holds the same gradient
        timer.lap("all_reduce", grads)
        optimizer.update(model, grads)
        timer.lap("optimizer", model.parameters(), optimizer.state)
        return loss_sum, ntoks

    return step


def validation_loss(model, valid_rows, args) -> float:
    """Mean token loss over ``--val-batches`` global batches of the validation rows,
    summed over all ranks (``mlx_lm``'s ``evaluate``). Leaves the model in train mode."""
    from mlx_lm.tuner.trainer import evaluate

    loss = evaluate(model, valid_rows, batch_size=args.batch_size,
                    num_batches=args.val_batches, max_seq_length=args.max_seq_length)
    model.train()
    return loss


def train(model, train_rows, valid_rows, args, group, outputs: Outputs, log):
    """The loop: ``args.iters`` optimizer steps with reports, validation and checkpoints.

    Returns ``(history, stats)``: the metric records written to ``metrics.jsonl`` and
    totals (seconds of training, tokens, steps).
    """
    from mlx_lm.tuner.trainer import grad_checkpoint, iterate_batches

    size = group.size()
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    optimizer = optim.Adam(learning_rate=args.learning_rate)
    timer = PhaseTimer(args.step_timing)
    step = make_step(model, optimizer, args, group, timer)
    state = [model.state, optimizer.state]
    batches = iterate_batches(train_rows, args.batch_size, args.max_seq_length, loop=True,
                              seed=args.seed, comm_group=group)
    history: list[dict] = []

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

    model.train()
    validate(0)
    bar = _progress_bar(args, group)
    window_loss, window_toks, window_time = mx.array(0.0), mx.array(0), 0.0
    train_seconds, train_tokens = 0.0, 0
    phase_totals = dict.fromkeys(PhaseTimer.PHASES, 0.0)
    for it in range(1, args.iters + 1):
        tic = time.perf_counter()
        timer.start()
        micro = [next(batches) for _ in range(args.grad_accumulation_steps)]
        timer.lap("data", *[a for pair in micro for a in pair])
        loss_sum, ntoks = step(micro)
        window_loss, window_toks = window_loss + loss_sum, window_toks + ntoks
        mx.eval(state, window_loss, window_toks)
        window_time += time.perf_counter() - tic
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
            saved = outputs.adapters(model, it)
            if saved:
                log(f"Iter {it}: saved {saved}", bar)
    bar.close()
    stats = {"train_seconds": train_seconds, "train_tokens": train_tokens}
    if timer.enabled:
        stats["step_seconds"] = {k: v / args.iters for k, v in phase_totals.items()}
    return history, stats


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress_bar(args, group):
    """A tqdm bar on rank 0's stderr (nothing on other ranks or with --no-progress)."""
    if group.rank() != 0 or args.no_progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=args.iters, desc="fine-tune", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


# ----------------------------------------------------------------------------- main

def run(args) -> dict:
    """Fine-tune as ``args`` say (see :func:`build_parser`); return the summary.

    Raises :class:`UsageError` / :class:`course_lib.data.DataError` on bad input before
    anything is written into ``--adapter-path``.
    """
    t_start = time.perf_counter()
    group, backend = dist.init_world(args.backend)
    size, rank = group.size(), group.rank()
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
    if args.resume_adapter_file:
        load_resume_weights(model, args.resume_adapter_file)

    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"{backend} backend, world size {size}: global batch {args.batch_size}, "
        f"{args.batch_size // size} rows per rank; {len(train_rows)} train / "
        f"{len(valid_rows)} valid rows")
    log(f"Trainable parameters: {100 * n_train / n_total:.3f}% "
        f"({n_train / 1e6:.3f}M/{n_total / 1e6:.3f}M), {args.fine_tune_type}, "
        f"{num_layers} layers")

    config = {k: v for k, v in vars(args).items()}
    config.update(model=model_id if args.model is None else args.model,
                  data=str(args.data) if args.data else "default sample (data-sets/pirate)",
                  num_layers=num_layers, lora_parameters=lora_parameters,
                  world_size=size, backend=backend)
    outputs = Outputs(Path(args.adapter_path), enabled=rank == 0)
    outputs.start(config)
    history, stats = train(model, train_rows, valid_rows, args, group, outputs, log)
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
        "all_reduce": args.all_reduce,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
