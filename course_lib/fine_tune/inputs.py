"""What a fine-tune reads: the model (``mlx_lm.load``), the data (``mlx_lm``'s dataset
classes, after :mod:`course_lib.data` validated every row), the adapters it adds
(``mlx_lm``'s ``linear_to_lora_layers``) and weights to start from."""

from __future__ import annotations

import types
import zlib
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.tuner.datasets import create_dataset
from mlx_lm.tuner.utils import linear_to_lora_layers

from course_lib import distributed as dist
from course_lib.data import read_records
from course_lib.models import ModelError, resolve
from course_lib.fine_tune.errors import UsageError


def load_model(name: str, lazy: bool = False, seed: int | None = None):
    """``(model, tokenizer, model_path)``: ``mlx_lm.load`` of model ``name``; with
    ``lazy`` its weights are read when first evaluated (a sharded run cuts them first).
    ``seed``: seeds MLX's random generator (``mx.random.seed``) after a course model is
    built and before ``mlx_lm.load``, so that what draws from it next (the LoRA matrices'
    initial values) is the same whether this call built the model or found it built
    (building draws from it: the tiny model's weights, the conversion's check load).
    ``None`` leaves the generator as it is.

    ``name`` is a course model (``smollm2[:DTYPE]``, ``tiny``: see :mod:`course_lib.models`,
    built on first use), a model folder, or a Hugging Face id. ``model_path`` is what
    ``mlx_lm.load`` loaded: the folder, or the Hub id. Raises :class:`UsageError` for a
    course model that cannot be built, a folder without ``config.json`` or weights, or a
    Hub id that cannot be fetched (offline).
    """
    try:
        path = resolve(name, log=lambda m: dist.eprint0(m))
    except ModelError as e:
        raise UsageError(f"--model {name}: {e}") from e
    if seed is not None:
        mx.random.seed(seed)
    p = Path(path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise UsageError(f"--model {name}: no config.json in that folder")
        if not any(p.glob("*.safetensors")):
            raise UsageError(f"--model {name}: no *.safetensors weights in that folder")
    try:
        model, tokenizer = load(path, lazy=lazy)
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


class Rows(NamedTuple):
    """The tokenized rows ``[(token_ids, prompt_offset), ...]`` of the two splits; ``valid``
    may be empty."""

    train: list
    valid: list


def load_data(data_dir: Path, tokenizer, plan) -> Rows:
    """:class:`Rows` ``(train, valid)`` from ``data_dir``, as ``plan`` (its
    ``mask_prompt``, ``max_seq_length``, ``batch_size``) says.

    Raises :class:`UsageError` when the folder or ``train.jsonl`` is missing, when either
    split is smaller than the global batch, or when no row of a split scores a token (the
    prompt masked and as long as ``--max-seq-length`` in every row); warns when some do not.
    """
    if not data_dir.is_dir():
        raise UsageError(f"--data {data_dir}: no such folder (it should hold train.jsonl and "
                         "valid.jsonl; make them with `python -m course_lib.data RAW OUT_DIR`)")
    if not (data_dir / "train.jsonl").is_file():
        raise UsageError(f"--data {data_dir}: no train.jsonl in that folder")
    train, cut = load_split(data_dir / "train.jsonl", tokenizer, plan.mask_prompt,
                            plan.max_seq_length)
    valid, cut_v = [], 0
    if (data_dir / "valid.jsonl").is_file():
        valid, cut_v = load_split(data_dir / "valid.jsonl", tokenizer, plan.mask_prompt,
                                  plan.max_seq_length)
    else:
        dist.eprint0(f"warning: no {data_dir / 'valid.jsonl'}; training without validation")
    if cut or cut_v:
        dist.eprint0(f"warning: {cut + cut_v} rows are longer than --max-seq-length "
                     f"{plan.max_seq_length} and were truncated; drop them instead with "
                     "`python -m course_lib.data ... --max-tokens`")
    # pad_batch's and default_loss's rule: a row scores targets max(offset, 1) .. its
    # length, but never the last position of a row cut to --max-seq-length.
    limit = plan.max_seq_length - 1
    why = (" the prompt (masked) fills all their --max-seq-length "
           f"{plan.max_seq_length} tokens" if plan.mask_prompt else
           f" --max-seq-length {plan.max_seq_length} leaves no target")
    for name, rows in (("train", train), ("valid", valid)):
        empty = sum(max(offset, 1) > min(len(tokens), limit) for tokens, offset in rows)
        if rows and empty == len(rows):
            raise UsageError(
                f"{data_dir / (name + '.jsonl')}: no row scores a token:{why}; raise "
                "--max-seq-length" + (", or pass --no-mask-prompt to score the prompts too"
                                      if plan.mask_prompt else ""))
        if empty:
            dist.eprint0(f"warning: {empty} rows of {name}.jsonl score no token:{why}")
    for name, rows in (("train", train), ("valid", valid)):
        if rows and len(rows) < plan.batch_size:
            raise UsageError(f"{data_dir / (name + '.jsonl')} has {len(rows)} rows, fewer than "
                             f"--batch-size {plan.batch_size}")
    return Rows(train, valid)


def add_adapters(model, plan) -> tuple[int, dict | None]:
    """Freeze ``model`` and make its last ``plan.num_layers`` layers trainable (LoRA/DoRA
    with ``plan.lora_parameters`` via ``mlx_lm``'s ``linear_to_lora_layers``, or the full
    layers; None: 16 or all, whichever is fewer; -1: all). Returns ``(num_layers,
    lora_parameters)``; raises :class:`UsageError` for too many layers."""
    n_model = len(model.layers)
    n = plan.num_layers
    if n is None:
        n = min(16, n_model)
    elif n == -1:
        n = n_model
    if n < 1 or n > n_model:
        raise UsageError(f"--num-layers {plan.num_layers}: the model has {n_model} layers "
                         "(use 1 to that, or -1 for all)")
    model.freeze()
    if plan.fine_tune_type == "full":
        for layer in model.layers[-n:]:
            layer.unfreeze()
        return n, None
    params = dict(plan.lora_parameters)
    linear_to_lora_layers(model, n, params, use_dora=plan.fine_tune_type == "dora")
    return n, params


def load_resume_weights(model, path: str, sharding=None) -> None:
    """Load adapter weights to continue from (whole arrays; under ``sharding``, a
    :class:`course_lib.fine_tune.sharding.Sharding`, each rank keeps its pieces); raises
    :class:`UsageError` when they do not fit the model's trainable parameters (names or
    shapes)."""
    weights = mx.load(path)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    if sharding is not None and sharding.sharded:
        trainable = sharding.whole_like(trainable)
    bad = [f"{k} {tuple(v.shape)}" for k, v in weights.items()
           if k not in trainable or trainable[k].shape != v.shape]
    if bad:
        raise UsageError(f"--resume-adapter-file {path} does not fit this model and LoRA "
                         f"setting: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    if sharding is not None:
        weights = sharding.local(weights)
    model.load_weights(list(weights.items()), strict=False)


def check_ranks_agree(group, **values) -> None:
    """Raise :class:`UsageError` on every rank when ``values`` (numbers, or strings compared
    by a CRC-32) differ between ranks: a host with another model or other data would
    train something else, and a rank that skipped a collective the others make would block
    them. Two small all-reduces (``all_max`` and ``all_min``); nothing at one rank."""
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
