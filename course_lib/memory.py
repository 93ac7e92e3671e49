"""Will it fit? Peak memory per rank of a fine-tune, predicted from the model's config,
and the bytes each rank sends per step, from the same counts.

    python -m course_lib.memory --model smollm2 --fine-tune-type full --ranks 2 \\
        --sharding fsdp --batch-size 8 --seq-length 64 [--budget-gb 1.5]

The terms, per rank, in bytes (float32 weights, Adam):

- **weights** ``4 P_held``: the whole model (``none``), 1/N of it (``fsdp``), or the
  model less (N-1)/N of the matrices tensor parallelism splits (``tensor``).
- **Adam** ``8 T_held``: two moments per trained parameter held.
- **gradients**: ZeRO's arithmetic counts ``4 T`` (Rajbhandari et al. 2020, section 3:
  16 bytes per parameter with Adam in mixed precision: 2 + 2 + 12; here all float32:
  4 + 4 + 8). MLX evaluates the backward pass and the optimizer update as one lazy graph
  and frees each gradient once its update is done, so at the peak only about one layer's
  gradients exist (measured: ``benchmarks/sharding.py``; the data-parallel peak of
  SmolLM2 at 1 and 2 ranks is weights + Adam + activations, with nothing left over).
  The estimate counts the largest unit's gradient, not ``4 T``.
- **activations**: what the backward pass keeps, per token and layer (floats): the
  residual input, two RMS norms (output and normalised input), q/k/v before and after
  RoPE, the attention scores and probabilities (``2 H L``), the attention output, o_proj,
  the MLP's gate, up, silu and product and down: about ``7d + 3 H_q h + 3 H_kv h + 2 H_q
  L + 5 I``; plus the output layer's logits at every scored position, three copies
  (logits, softmax, their gradient) of ``V`` floats. Under ``fsdp`` each block is
  recomputed in the backward pass (``mx.checkpoint``), so only its input (``d`` per
  token) is kept, plus one block's activations at a time. Under ``tensor`` each rank
  computes the whole batch, with its share of the heads and of the MLP width.
- **transient** (``fsdp``): the gathered whole parameters of the largest unit, twice
  (its forward and the backward's re-gather), and where the backend has no
  reduce-scatter, the all-summed whole gradient of the largest trained unit, twice.

The activations term is an estimate from the op list above, not a measurement; the
benchmark sets the prediction beside the measured peak for each mode and model size.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from course_lib.fine_tune.options import recipe_for
from course_lib.models import resolve
from course_lib.traffic import ring_bytes_sent, ring_fraction

MODES = ("none", "fsdp", "tensor")
FLOAT = 4  # bytes


# --------------------------------------------------------------------------- counts

def _layer_counts(c: dict) -> dict:
    d, i = c["hidden_size"], c["intermediate_size"]
    hq = c["num_attention_heads"]
    hkv = c.get("num_key_value_heads") or hq
    hd = c.get("head_dim") or d // hq
    attn = d * hq * hd * 2 + d * hkv * hd * 2
    if c.get("attention_bias"):
        attn += hq * hd * 2 + hkv * hd * 2
    mlp = 3 * d * i + (2 * i + d if c.get("mlp_bias") else 0)
    return {"attention": attn, "mlp": mlp, "norms": 2 * d}


def parameter_counts(config: dict) -> dict:
    """Parameters of a llama/mistral ``config`` (a ``config.json`` dict) by part:
    ``embedding``, ``lm_head`` (0 when tied), ``final_norm``, and per layer
    ``attention``, ``mlp``, ``norms``; ``layers`` and ``total``."""
    d, v = config["hidden_size"], config["vocab_size"]
    tied = config.get("tie_word_embeddings", True)
    per = _layer_counts(config)
    layers = config["num_hidden_layers"]
    total = v * d + (0 if tied else v * d) + d + layers * sum(per.values())
    return {"embedding": v * d, "lm_head": 0 if tied else v * d, "final_norm": d,
            "per_layer": per, "layers": layers, "total": total}


def trainable_count(config: dict, fine_tune_type: str, num_layers: int,
                    lora_rank: int = 8) -> int:
    """Trained parameters: ``full``: the last ``num_layers`` blocks (embedding and final
    norm stay frozen, as :func:`course_lib.fine_tune.add_adapters` does); ``lora``: rank
    ``lora_rank`` A and B matrices on the 7 projections of the last ``num_layers`` blocks
    (``mlx_lm``'s default keys)."""
    per = _layer_counts(config)
    if fine_tune_type == "full":
        return num_layers * sum(per.values())
    d, i = config["hidden_size"], config["intermediate_size"]
    hq = config["num_attention_heads"]
    hkv = config.get("num_key_value_heads") or hq
    hd = config.get("head_dim") or d // hq
    shapes = [(d, hq * hd), (d, hkv * hd), (d, hkv * hd), (hq * hd, d), (d, i), (d, i),
              (i, d)]
    return num_layers * sum(lora_rank * (a + b) for a, b in shapes)


def tensor_split(config: dict, ranks: int) -> dict:
    """What ``--sharding tensor`` splits at ``ranks``: ``{"attention": bool, "mlp":
    bool}`` (heads, MLP width divisible), as :mod:`course_lib.fine_tune.sharding` does."""
    hq = config["num_attention_heads"]
    hkv = config.get("num_key_value_heads") or hq
    return {"attention": hq % ranks == 0 and hkv % ranks == 0,
            "mlp": config["intermediate_size"] % ranks == 0}


# --------------------------------------------------------------------------- memory

@dataclass
class Estimate:
    """Predicted peak bytes per rank, by term (see the module docstring)."""
    mode: str
    ranks: int
    rows_per_rank: int
    weights: float
    adam: float
    gradients: float
    activations: float
    transient: float

    @property
    def total(self) -> float:
        return self.weights + self.adam + self.gradients + self.activations + self.transient

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def estimate(config: dict, mode: str = "none", ranks: int = 1, batch_size: int = 8,
             seq_length: int = 512, fine_tune_type: str = "lora", num_layers: int = -1,
             lora_rank: int = 8, native_reduce_scatter: bool = False) -> Estimate:
    """Predicted peak memory per rank (bytes, :class:`Estimate`) of a fine-tune with Adam.

    ``config``: the model's ``config.json`` dict (llama/mistral); ``mode``: ``none``,
    ``fsdp`` or ``tensor``; ``batch_size``: the global batch in rows; ``seq_length``:
    tokens per row (the padded batch width; the model sees ``seq_length - 1`` positions);
    ``num_layers``: trained blocks (-1: all). Raises ``ValueError`` for a mode that cannot
    run (1 rank, a batch not divisible by the ranks).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "none" and ranks < 2:
        raise ValueError(f"--sharding {mode} needs at least 2 ranks")
    if batch_size % ranks:
        raise ValueError(f"--batch-size {batch_size} is not divisible by {ranks} ranks")
    counts = parameter_counts(config)
    layers = counts["layers"]
    n_layers = layers if num_layers == -1 else num_layers
    per = counts["per_layer"]
    trained = trainable_count(config, fine_tune_type, n_layers, lora_rank)
    d, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hq = config["num_attention_heads"]
    hkv = config.get("num_key_value_heads") or hq
    hd = config.get("head_dim") or d // hq
    pos = max(seq_length - 1, 1)
    rows = batch_size if mode == "tensor" else batch_size // ranks
    tokens = rows * pos
    logits = tokens * 3 * v * FLOAT
    layer_t = trained / n_layers  # trained parameters in one trained block
    n = ranks

    def block_acts(hq, hkv, i):  # floats per token and layer
        return 7 * d + 3 * hq * hd + 3 * hkv * hd + 2 * hq * pos + 5 * i

    if mode == "none":
        held, held_t = counts["total"], trained
        acts = tokens * layers * block_acts(hq, hkv, i) * FLOAT + logits
        grads, transient = layer_t * FLOAT, 0.0
    elif mode == "fsdp":
        held, held_t = counts["total"] / n, trained / n
        acts = tokens * (layers * d + block_acts(hq, hkv, i)) * FLOAT + logits
        grads = layer_t / n * FLOAT
        largest = max(counts["embedding"], counts["lm_head"], sum(per.values()))
        transient = 2 * largest * FLOAT
        if not native_reduce_scatter:
            transient += 2 * layer_t * FLOAT
    else:
        split = tensor_split(config, n)
        if not split["mlp"]:
            raise ValueError(f"--sharding tensor: the MLP width {i} does not divide by {n}")
        cut = per["mlp"] + (per["attention"] if split["attention"] else 0)
        held = counts["total"] - layers * cut * (n - 1) / n
        frac = (cut * (n - 1) / n) / sum(per.values())
        held_t = trained * (1 - frac)
        a = split["attention"]
        acts = tokens * layers * block_acts(hq // n if a else hq, hkv // n if a else hkv,
                                            i // n) * FLOAT + logits
        grads, transient = layer_t * (1 - frac) * FLOAT, 0.0
    return Estimate(mode, ranks, rows, held * FLOAT, held_t * 2 * FLOAT, grads, acts,
                    transient)


def largest_batch(config: dict, budget_bytes: float, mode: str, ranks: int,
                  seq_length: int, max_batch: int = 4096, **kw) -> int:
    """The largest global batch (a multiple of ``ranks``) whose :func:`estimate` fits in
    ``budget_bytes`` per rank; 0 when not even ``ranks`` rows fit."""
    best, b = 0, ranks
    while b <= max_batch:
        if estimate(config, mode, ranks, b, seq_length, **kw).total > budget_bytes:
            break
        best, b = b, b + ranks
    return best


def suggest(config: dict, budget_bytes: float, ranks: int, batch_size: int,
            seq_length: int, **kw) -> dict:
    """The mode to use for a global batch of ``batch_size`` within ``budget_bytes`` per
    rank, and the largest global batch each mode fits.

    Preference when several fit: ``none`` (the least traffic per step, no recomputed
    forward), then ``fsdp`` (memory falls as 1/N for everything but activations; sends
    about 1.5x data parallelism's bytes), then ``tensor`` (sends activations at every
    layer: for fast links). Returns ``{"mode": str | None, "largest_batch": {mode: rows},
    "reason": str}``."""
    modes = ["none"] + (["fsdp", "tensor"] if ranks > 1 else [])
    largest = {}
    for m in modes:
        try:
            largest[m] = largest_batch(config, budget_bytes, m, ranks, seq_length, **kw)
        except ValueError:
            largest[m] = 0
    fits = [m for m in modes if largest[m] >= batch_size]
    if fits:
        mode = fits[0]
        reason = (f"--sharding {mode} fits a global batch of {batch_size} "
                  f"(up to {largest[mode]})")
    else:
        mode = max(largest, key=largest.get) if any(largest.values()) else None
        reason = (f"no mode fits a global batch of {batch_size} in {budget_bytes / 1e9:.2f} "
                  f"GB per rank; " + (f"--sharding {mode} fits up to {largest[mode]}"
                                      if mode else "none fits even one row per rank: more "
                                      "ranks, shorter rows, or LoRA"))
    return {"mode": mode, "largest_batch": largest, "reason": reason}


# --------------------------------------------------------------------------- bytes sent

def collective_bytes(config: dict, mode: str, ranks: int, batch_size: int, seq_length: int,
                     fine_tune_type: str = "lora", num_layers: int = -1, lora_rank: int = 8,
                     native_reduce_scatter: bool = False) -> dict:
    """Bytes one rank sends per step, by the textbook formulas, with ring collectives
    (:func:`course_lib.traffic.ring_bytes_sent`):
    ``{"formula": bytes, "as_built": bytes, "terms": {...}}``.

    ``none``: an all-reduce of the gradients, ``2(N-1)/N * 4T``. ``fsdp`` (ZeRO-3): an
    all-gather of the weights in the forward pass and again in the backward pass,
    ``2 (N-1)/N * 4P``, and a reduce-scatter of the gradients, ``(N-1)/N * 4T`` (1.5x
    data parallelism when everything is trained). ``tensor`` (Megatron-LM): all-reduces
    of the activations ``B L d`` floats, 2 per block forward (after attention and after
    the MLP) and 2 backward. ``as_built`` is what this course's code builds: FSDP's
    reduce-scatter as an all-sum when the backend lacks one (twice the bytes), the tied
    embedding gathered for the lookup and again, with its re-gather, for the output
    layer; MLX's tensor-parallel layers all-sum the input gradient of each split
    projection separately (q, k, v, gate, up: 5 backward instead of Megatron's 2, which
    fuses q/k/v and gate/up), and only the MLP when the heads do not divide.
    """
    counts = parameter_counts(config)
    n = ranks
    f = ring_fraction(n)  # (N-1)/N of a whole array per all-gather or reduce-scatter
    nl = counts["layers"] if num_layers == -1 else num_layers
    t = trainable_count(config, fine_tune_type, nl, lora_rank) * FLOAT
    p = (counts["total"] * FLOAT) + (t if fine_tune_type == "lora" else 0)  # LoRA's too
    if mode == "none":
        grads = ring_bytes_sent("all_sum", t, n)
        return {"formula": grads, "as_built": grads, "terms": {"all-reduce gradients": grads}}
    if mode == "fsdp":
        rs = ring_bytes_sent("sum_scatter" if native_reduce_scatter else "all_sum", t, n)
        emb = counts["embedding"] * FLOAT if config.get("tie_word_embeddings", True) else 0
        return {"formula": 2 * f * p + f * t, "as_built": 2 * f * p + f * emb + rs,
                "terms": {"all-gather forward": f * p, "all-gather backward": f * p,
                          "reduce-scatter gradients": f * t}}
    act = batch_size * max(seq_length - 1, 1) * config["hidden_size"] * FLOAT
    split = tensor_split(config, n)
    layers = counts["layers"]
    built = (2 + 5) if split["attention"] else (1 + 2)
    lora = 0.0
    if fine_tune_type == "lora":  # r-wide all-sums: one per split LoRA layer
        per_tok = batch_size * max(seq_length - 1, 1) * lora_rank * FLOAT
        lora = nl * per_tok * (7 if split["attention"] else 3)
    one = ring_bytes_sent("all_sum", act, n)  # one all-reduce of the activations
    return {"formula": one * 4 * layers,
            "as_built": ring_bytes_sent("all_sum", act * built * layers + lora, n),
            "terms": {"all-reduce activations forward": one * 2 * layers,
                      "all-reduce activations backward": one * 2 * layers}}


# --------------------------------------------------------------------------- CLI

def model_config(model: str) -> dict:
    """``config.json`` of ``--model`` (a course model name, built on first use, or a
    folder)."""
    path = Path(resolve(model))
    return json.loads((path / "config.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m course_lib.memory",
                                description="Predict peak memory per rank of a fine-tune "
                                "and suggest a sharding mode and batch for a budget.")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--fine-tune-type", choices=["lora", "full"], default="lora")
    p.add_argument("--num-layers", type=int, help="trained blocks; -1: all (default: the "
                   "fine-tune's recipe)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--sharding", choices=MODES, default="none")
    p.add_argument("--batch-size", type=int, help="global batch in rows (default: the "
                   "recipe's)")
    p.add_argument("--seq-length", type=int, help="tokens per row, the padded width "
                   "(default: the recipe's --max-seq-length, the worst case)")
    p.add_argument("--budget-gb", type=float, help="memory per rank (1e9 bytes): suggest a "
                   "mode and the largest batch that fit")
    p.add_argument("--native-reduce-scatter", action="store_true",
                   help="the backend has sum_scatter (NCCL); default: MPI/ring, which do not")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    _, recipe = recipe_for(args.model)  # what the fine-tune fills in for options left out
    ns = argparse.Namespace(**{key: recipe[key] if given is None else given for key, given in
                               (("num_layers", args.num_layers), ("lora_rank", args.lora_rank),
                                ("batch_size", args.batch_size),
                                ("max_seq_length", args.seq_length))})
    config = model_config(args.model)
    layers = config["num_hidden_layers"]
    nl = layers if ns.num_layers in (None, -1) else ns.num_layers
    kw = dict(fine_tune_type=args.fine_tune_type, num_layers=nl, lora_rank=ns.lora_rank,
              native_reduce_scatter=args.native_reduce_scatter)
    try:
        e = estimate(config, args.sharding, args.ranks, ns.batch_size, ns.max_seq_length,
                     **kw)
        t = collective_bytes(config, args.sharding, args.ranks, ns.batch_size,
                             ns.max_seq_length, **kw)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = {"estimate": e.as_dict(), "traffic": t}
    if args.budget_gb:
        out["suggestion"] = suggest(config, args.budget_gb * 1e9, args.ranks, ns.batch_size,
                                    ns.max_seq_length, **kw)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    counts = parameter_counts(config)
    print(f"{args.model}: {counts['total'] / 1e6:.1f}M parameters, {args.fine_tune_type} on "
          f"{nl} of {layers} layers ({trainable_count(config, args.fine_tune_type, nl, ns.lora_rank) / 1e6:.1f}M trained); "
          f"--sharding {args.sharding} at {args.ranks} rank(s), global batch {ns.batch_size} "
          f"({e.rows_per_rank} rows per rank) of {ns.max_seq_length} tokens")
    for term in ("weights", "adam", "gradients", "activations", "transient"):
        print(f"  {term:<12} {getattr(e, term) / 1e9:8.3f} GB")
    print(f"  {'peak':<12} {e.total / 1e9:8.3f} GB per rank (predicted)")
    print(f"  sends {t['as_built'] / 1e6:.1f} MB per step per rank (textbook formula "
          f"{t['formula'] / 1e6:.1f} MB)")
    if "suggestion" in out:
        s = out["suggestion"]
        print(f"Budget {args.budget_gb:g} GB per rank: {s['reason']}. Largest global batch: "
              + ", ".join(f"{m} {b}" for m, b in s["largest_batch"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
