"""The tiny test model: a small Mistral-architecture causal LM the package builds itself.

The course's model is a real one (SmolLM2-135M-Instruct, :mod:`course_lib.models`). This
module builds a model of the architecture the walkthrough fine-tunes (``model_type:
mistral``: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP) with 2 million
parameters, so that tests of the distributed machinery (1 rank == N ranks, checkpoints,
faults) run in seconds, with no download:

1. a byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on the course text, with
   Mistral's ``[INST] ... [/INST]`` chat template;
2. a short full-weight pretraining pass on plain-English instruction data
   (``assets/pretrain_corpus.jsonl``: the instructions and contexts of the sample set's
   *training* rows and its long rows, with plain-English answers; the validation split's
   rows are left out, so validation measures rows the model never saw);
3. saved in the Hugging Face layout (``config.json``, ``model.safetensors``,
   ``tokenizer.json``, ``tokenizer_config.json``) that ``mlx_lm.load``,
   ``mlx_lm.generate``, ``mlx_lm.lora`` and ``course_lib.fine_tune`` accept.

It writes something like English, not good English: it is a test model. The build is
deterministic for a seed on one machine (same BLAS, same thread count) and is cached under
:func:`course_lib.cache.cache_dir` in a folder named after a hash of its recipe, so a
changed recipe builds a new model. ``build_info.json`` in that folder records what building
cost.

CLI: ``python -m course_lib.tiny_model [--out DIR] [--force]`` builds it and prints where
(``python -m course_lib.models tiny`` prints the cached one).
"""

from __future__ import annotations

if __name__ == "__main__":  # before MLX loads: see course_lib.blas
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from functools import partial
from pathlib import Path

from course_lib.cache import building, cache_dir, file_lock
from course_lib.chat import to_chat_record  # one conversion for the whole course

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS = ASSETS / "pretrain_corpus.jsonl"

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
INST, END_INST = "[INST]", "[/INST]"

# Mistral's template, as in mistralai/Mistral-7B-Instruct-v0.2's tokenizer_config.json,
# with a system message (if any) placed before the first instruction.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the tiny model's weights. Changing a field rebuilds it.

    Sizes: ``hidden_size`` x ``num_hidden_layers`` gives ~2.6M parameters with the
    defaults, of which 0.5M are the (tied) embeddings.
    """

    vocab_size: int = 2048
    hidden_size: int = 192
    num_hidden_layers: int = 4
    intermediate_size: int = 512
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # pretraining
    seed: int = 0
    steps: int = 600
    batch_size: int = 8
    max_seq_length: int = 128
    learning_rate: float = 4e-4  # measured: 4e-4 beat 2e-4, 1e-3, 2e-3, 6e-3 and 1.5e-2
    warmup_steps: int = 30


def recipe_id(recipe: Recipe = Recipe()) -> str:
    """Short hash of the recipe, the pretraining corpus and this file's build code."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    h.update(CORPUS.read_bytes())
    h.update(b"v1")  # bump when the build code changes what it produces
    return h.hexdigest()[:10]


def tiny_model_path(recipe: Recipe = Recipe()) -> Path:
    """The cache folder of the tiny model (it may not be built yet)."""
    return cache_dir() / "models" / f"tiny-mistral-{recipe_id(recipe)}"


def load_corpus(path: Path = CORPUS) -> list[dict]:
    """Chat records ``{"messages": [user, assistant]}`` from the pretraining corpus.

    Raises ``ValueError`` naming the file and line of a bad record.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                records.append(to_chat_record(
                    {"instruction": row["instruction"], "context": row["context"],
                     "response": row["plain_response"], "category": row.get("category", "")}))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad pretraining record ({e})") from e
    return records


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<s>``, ``</s>``, ``<unk>``,
    ``<pad>``, ``[INST]`` and ``[/INST]`` as special tokens and the chat template set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS, PAD, INST, END_INST]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=Recipe.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(recipe: Recipe, tokenizer) -> dict:
    """The Hugging Face ``config.json`` of a Mistral-architecture model of this recipe."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": len(tokenizer),
        "hidden_size": recipe.hidden_size,
        "num_hidden_layers": recipe.num_hidden_layers,
        "intermediate_size": recipe.intermediate_size,
        "num_attention_heads": recipe.num_attention_heads,
        "num_key_value_heads": recipe.num_key_value_heads,
        "max_position_embeddings": recipe.max_position_embeddings,
        "rope_theta": recipe.rope_theta,
        "rms_norm_eps": recipe.rms_norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "sliding_window": None,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
    }


def pretrain(model, token_rows: list[list[int]], recipe: Recipe, log=print) -> dict:
    """Full-weight next-token training of ``model`` on ``token_rows`` (lists of token ids).

    Adam with linear warm-up then cosine decay; rows longer than
    ``recipe.max_seq_length`` are cut (this is pretraining, not the course's fine-tune).
    Returns ``{"steps", "tokens", "first_loss", "final_loss", "seconds"}``.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.trainer import default_loss

    rng = np.random.default_rng(recipe.seed)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, recipe.learning_rate, recipe.warmup_steps),
         optim.cosine_decay(recipe.learning_rate, recipe.steps - recipe.warmup_steps,
                            recipe.learning_rate / 20)],
        [recipe.warmup_steps],
    )
    optimizer = optim.Adam(learning_rate=schedule)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, ntoks), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss, ntoks

    order: list[int] = []
    tokens = 0
    first = last = float("nan")
    tic = time.perf_counter()
    for it in range(1, recipe.steps + 1):
        if len(order) < recipe.batch_size:
            order.extend(rng.permutation(len(token_rows)).tolist())
        idx, order = order[: recipe.batch_size], order[recipe.batch_size :]
        rows = [token_rows[i][: recipe.max_seq_length] for i in idx]
        width = 32 * math.ceil(max(len(r) for r in rows) / 32)  # few shapes to compile
        arr = np.zeros((len(rows), width), np.int32)
        for j, r in enumerate(rows):
            arr[j, : len(r)] = r
        lengths = mx.array([[0, len(r)] for r in rows])
        loss, ntoks = step(mx.array(arr), lengths)
        mx.eval(state, loss)
        tokens += int(ntoks.item())
        last = loss.item()
        if it == 1:
            first = last
        if it % 50 == 0 or it == recipe.steps:
            log(f"  pretraining step {it}/{recipe.steps}: loss {last:.3f} "
                f"({time.perf_counter() - tic:.0f} s)")
    return {"steps": recipe.steps, "tokens": tokens, "first_loss": first,
            "final_loss": last, "seconds": time.perf_counter() - tic}


def build(out: Path, recipe: Recipe = Recipe(), log=print) -> dict:
    """Build the tiny model into the folder ``out`` (created; must not exist yet).

    Writes into a temporary sibling folder and renames it at the end, so ``out`` is either
    complete or absent. Returns the build info also saved as ``out/build_info.json``:
    parameters, pretraining tokens and losses, and seconds spent on each part.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama  # mlx_lm maps model_type "mistral" to its llama module
    from mlx_lm.utils import save_config, save_model

    out = Path(out)
    t0 = time.perf_counter()
    records = load_corpus()
    texts = []
    for rec in records:
        texts.extend(m["content"] for m in rec["messages"])
    tokenizer = train_tokenizer(texts, recipe.vocab_size)
    t_tok = time.perf_counter() - t0

    config = model_config(recipe, tokenizer)
    mx.random.seed(recipe.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"  {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
        f"{len(records)} pretraining records")
    rows = [tokenizer.apply_chat_template(r["messages"], return_dict=False) for r in records]
    stats = pretrain(model, rows, recipe, log=log)

    with building(out) as tmp:
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        info = {
            "recipe": dataclasses.asdict(recipe),
            "recipe_id": recipe_id(recipe),
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "pretraining": stats,
            "tokenizer_seconds": t_tok,
            "total_seconds": time.perf_counter() - t0,
            "mlx_version": mx.__version__,
        }
        (tmp / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def ensure_tiny_model(log=None) -> Path:
    """Path of the tiny model, building it first if it is not in the cache.

    Safe to call from several ranks on one host at once: one builds, the others wait on a
    file lock and then find it. ``log`` (default: print to stderr) receives progress lines.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = tiny_model_path()
    if (path / "config.json").exists():
        return path
    with file_lock(path.parent / ".build.lock"):
        if (path / "config.json").exists():
            return path
        log(f"Building the tiny model (first use) into {path}")
        info = build(path, log=log)
        log(f"Built the tiny model in {info['total_seconds']:.0f} s: "
            f"{info['parameters'] / 1e6:.2f}M parameters, pretraining loss "
            f"{info['pretraining']['first_loss']:.2f} -> {info['pretraining']['final_loss']:.2f}")
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course_lib.tiny_model",
                                     description="Build the course's tiny test model (python -m course_lib.models tiny "
                                     "does the same).")
    parser.add_argument("--out", type=Path, help="folder to build into (default: the cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = parser.parse_args(argv)
    if args.out is None:
        if args.force and tiny_model_path().exists():
            shutil.rmtree(tiny_model_path())
        print(ensure_tiny_model())
        return 0
    if args.out.exists():
        if not args.force:
            parser.error(f"--out {args.out} exists (add --force to replace it)")
        shutil.rmtree(args.out)
    build(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
