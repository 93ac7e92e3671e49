"""The plan of a fine-tune: every setting the run uses, resolved once from the command line.

:func:`resolve` takes argparse's namespace (:func:`course_lib.fine_tune.options.
build_parser`) and the world size, fills what was left out from the model's recipe, makes
every check that needs no model or data (raising :class:`UsageError` naming the option),
and computes every choice derived from the options (compiled or not, the loss, the
all-reduce's form, the padding rule, the LoRA parameters, the streams per rank). The
result, a frozen :class:`Plan`, is what the loop, the step, the sharding, the inputs and
the reporting read; nothing edits it. A test can write one as a literal, as ``mlx_lm``'s
trainer is tested with its ``TrainingArgs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from course_lib import blas
from course_lib import distributed as dist
from course_lib.fine_tune.errors import UsageError
from course_lib.fine_tune.options import (DEFAULT_ADAPTER_PATH, DEFAULT_DATA, apply_recipe,
                                          build_parser)
from course_lib.fine_tune.callbacks import check_report_to
from course_lib.fine_tune.sharding import MODES as SHARDING_MODES


@dataclass(frozen=True)
class Plan:
    """Every setting of a fine-tune (options named as ``mlx_lm.lora`` names them; see
    ``python -m course_lib.fine_tune --help``), then what :func:`resolve` derived from them.
    The defaults make a literal a short test: the tiny model, the ``tiny`` recipe's numbers
    and the options' defaults, no progress bar, one rank, not compiled. A literal whose
    derived fields contradict the others raises ``ValueError`` (:meth:`__post_init__`)."""

    model: str = "tiny"
    data: Path = DEFAULT_DATA
    fine_tune_type: str = "lora"
    num_layers: int | None = -1  # None: 16 or all, whichever is fewer; -1: all
    batch_size: int = 8  # the GLOBAL batch, rows
    iters: int = 200
    val_batches: int = -1  # -1: the whole validation set
    learning_rate: float = 5e-4
    warmup_steps: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 50
    save_every: int = 100
    adapter_path: str = DEFAULT_ADAPTER_PATH
    resume_adapter_file: str | None = None
    resume: bool = False
    step_timeout: float = 300.0  # seconds; 0: never
    max_seq_length: int = 512  # tokens
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    seed: int = 0
    mask_prompt: bool = False
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_scale: float | None = None
    lora_dropout: float = 0.0
    backend: str = "none"  # the backend the world started with (distributed.init_world)
    loss_weighting: str = "tokens"
    step_timing: bool = False
    rank_timing: bool = True
    report_to: str | None = None
    project_name: str | None = None
    sharding: str = "none"
    no_progress: bool = True
    # --- derived by resolve()
    recipe: str = "other"
    world_size: int = 1
    compile: bool = False  # mx.compile the step (compile_by_default, or --compile)
    loss: str = "scored"  # scored or all; all when compiled (loss.loss_function)
    all_reduce: str = "plain"  # plain or bucketed
    pad_multiple: int = 1  # batches padded to a multiple of this (batches.pad_batch)
    lora_parameters: dict | None = field(
        default_factory=lambda: {"rank": 8, "scale": 20.0, "dropout": 0.0})
    streams: int = 1  # MLX streams computing this rank's rows at once (--streams)
    wide_evaluation_order: bool = False  # MLX_BFS_MAX_WIDTH=1000 (speed.order_for_streams)
    options: dict = field(default_factory=dict)  # the command line, recipe applied

    def __post_init__(self):
        """Raise ``ValueError`` when derived fields contradict the fields they come from
        (a literal written by hand: :func:`resolve` makes them agree)."""
        if self.compile and (self.loss != "all" or self.pad_multiple != 32):
            raise ValueError("a compiled plan uses loss 'all' and pad_multiple 32 (resolve())")
        if not self.compile and self.pad_multiple != 1:
            raise ValueError("a plan that is not compiled pads to a multiple of 1")
        if self.lora_parameters and self.lora_parameters.get("rank") != self.lora_rank:
            raise ValueError(f"lora_parameters' rank {self.lora_parameters.get('rank')} is "
                             f"not lora_rank {self.lora_rank}")
        if self.streams > 1 and self.sharding != "none":
            raise ValueError("a sharded plan computes on one stream")

    @property
    def rows_per_rank(self) -> int:
        """Rows of each global batch one rank computes: all of them under ``tensor``
        (every rank computes the whole batch), else ``batch_size / world_size``."""
        return self.batch_size if self.sharding == "tensor" else \
            self.batch_size // self.world_size


def parse(argv: list[str], world_size: int = 1, backend: str = "none", rank: int = 0) -> Plan:
    """:func:`resolve` of the command line ``argv`` (``["--model", "tiny", ...]``)."""
    return resolve(build_parser().parse_args([str(a) for a in argv]), world_size, backend,
                   rank)


def resolve(args: argparse.Namespace, world_size: int = 1, backend: str = "none",
            rank: int = 0) -> Plan:
    """The :class:`Plan` of options ``args`` (left unchanged) for rank ``rank`` of
    ``world_size`` ranks of ``backend`` (``"none"``, ``"mpi"``, ``"ring"``...). Raises
    :class:`UsageError`, naming the option, for values that cannot run; with
    ``--report-to``, for a service whose package is missing (checked on rank 0 only, which
    alone reports)."""
    args = argparse.Namespace(**vars(args))
    recipe = apply_recipe(args)
    options = dict(vars(args))
    check_numbers(args, world_size)
    lora = lora_parameters(args)
    # Only rank 0 reports, so only its machine needs the reporting packages.
    check_report_to(args.report_to, need_packages=rank == 0)
    check_sharding(args, world_size)
    if args.sharding != "none":
        options["compile"] = False  # a sharded run is never compiled
    compiled = args.compile if args.compile is not None else (
        False if args.sharding != "none" else compile_by_default())
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Plan)
             if hasattr(args, f.name) and f.name not in ("compile", "loss", "streams",
                                                          "all_reduce", "backend")}
    given["data"] = Path(args.data) if args.data else DEFAULT_DATA
    rows = args.batch_size // (1 if args.sharding == "tensor" else world_size)
    return Plan(**given, recipe=recipe, world_size=world_size, backend=backend,
                compile=compiled, loss="all" if compiled else args.loss,
                all_reduce=all_reduce_form(args.all_reduce, dist.detect_backend() or backend,
                                           world_size),
                pad_multiple=32 if compiled else 1,
                lora_parameters=lora if args.fine_tune_type != "full" else None,
                streams=streams_per_rank(args.streams, rows, args.sharding != "none",
                                         compiled, args.fine_tune_type == "full"),
                wide_evaluation_order=(args.streams != 1 and args.fine_tune_type != "full"
                                       and args.sharding == "none" and not compiled),
                options=options)


def check_numbers(args, world_size: int) -> None:
    """Raise :class:`UsageError` for option values that cannot run at ``world_size``
    ranks, before any work."""
    positive = ["iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every",
                "grad_accumulation_steps", "max_seq_length"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, name)}")
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
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
    if args.streams not in ("auto", 1) and args.sharding != "none":
        raise UsageError(f"--streams {args.streams} needs --sharding none: a sharded "
                         "step's collectives run inside the backward pass, in one order "
                         "on every rank, so it computes on one stream")


def check_sharding(args, world_size: int) -> None:
    """Raise :class:`UsageError` for a ``--sharding`` that cannot run with these options
    at ``world_size`` ranks, before anything is loaded. A sharded run is never compiled
    (``--compile`` left out means ``--no-compile``; asked for, an error)."""
    mode = args.sharding
    if mode not in SHARDING_MODES:
        raise UsageError(f"--sharding must be one of {', '.join(SHARDING_MODES)}, got {mode!r}")
    if mode == "none":
        return
    if world_size < 2:
        raise UsageError(f"--sharding {mode} splits the model across ranks and needs at least "
                         f"2; this run has 1 (start it with mpirun -np 2 ... or mlx.launch "
                         "-n 2 ...)")
    if args.fine_tune_type not in ("lora", "full"):
        raise UsageError(f"--sharding {mode} works with --fine-tune-type lora or full, not "
                         f"{args.fine_tune_type}")
    if args.loss_weighting != "tokens":
        raise UsageError(f"--sharding {mode} weights the loss by tokens; --loss-weighting "
                         f"{args.loss_weighting} is for --sharding none")
    if args.compile:
        raise UsageError(f"--sharding {mode} runs op by op: leave out --compile")
    if mode == "fsdp" and args.lora_dropout > 0:
        raise UsageError("--sharding fsdp recomputes each block's forward pass in the "
                         "backward pass, which would draw other dropout masks: use "
                         "--lora-dropout 0")


def lora_parameters(args) -> dict:
    """mlx_lm's ``lora_parameters`` dict from our options: rank, scale, dropout (+alpha);
    scale = alpha / rank with ``--lora-alpha`` (Hu et al. 2021), else ``--lora-scale``,
    else mlx_lm's 20.0. Raises :class:`UsageError` for values that cannot run."""
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


def compile_by_default() -> bool:
    """Whether a step is ``mx.compile``d when neither ``--compile`` nor ``--no-compile``
    is given: on an Apple GPU yes (Metal kernels fuse and launch less often, which is why
    mlx_lm compiles its step); elsewhere no. Measured (benchmarks/step_anatomy.py,
    benchmarks/gpu.py; benchmarks/README.md): on a CPU the compiled step was no faster,
    and on an NVIDIA GPU each new batch shape cost seconds of tracing."""
    return mx.metal.is_available()


# The ring backend's single calls are slow to start, MPI's cheap: benchmarks/all_reduce.py
# and benchmarks/README.md measure both forms of the average under each backend.
def all_reduce_form(choice: str, backend: str, world_size: int) -> str:
    """``plain`` or ``bucketed`` for ``--all-reduce`` ``choice``; ``auto`` picks plain (the
    course's all_reduce_grads) where a call is cheap (MPI, one rank) and bucketed where
    each call pays a large fixed latency (the ring backend)."""
    if choice != "auto":
        return choice
    return "bucketed" if backend == "ring" and world_size > 1 else "plain"


def streams_per_rank(choice, rows: int, sharded: bool = False, compiled: bool = False,
                     full: bool = False) -> int:
    """How many MLX streams compute this rank's share at once, for ``--streams`` ``choice``
    (``"auto"`` or a number) and ``rows`` rows per micro-batch on this rank: never more
    than ``rows``, and 1 under sharding (its collectives inside the backward pass must run
    in the same order on every rank). ``auto`` is 1 on a GPU (one stream already fills
    it), for a ``compiled`` step and for a ``full`` fine-tune (each stream would hold a
    gradient as large as the model until they are added, which
    :func:`course_lib.memory.estimate` does not count); otherwise, on a CPU, the cores this
    rank has: the OpenBLAS threads it was given (:func:`course_lib.blas.blas_threads`),
    else ``os.cpu_count() // ranks on this host``.

    Why: MLX's CPU backend runs each stream's operations on that stream's own thread, and
    only the matmuls (OpenBLAS) spread over more cores; everything between them runs on one
    core (measured: ``benchmarks/real_model.py``, benchmarks/README.md)."""
    if sharded:
        return 1
    if choice == "auto":
        if compiled or full or mx.default_device() == mx.gpu:
            return 1
        choice = blas.blas_threads() or max(1, (os.cpu_count() or 1)
                                            // blas.ranks_on_this_host())
    return max(1, min(int(choice), rows))
