"""The course's real model (SmolLM2-135M-Instruct, float32) on this machine: model FLOPs
utilization at 1 rank, 2 ranks against 1, the step's anatomy, what the fast paths buy, and
one forward pass by the weights' dtype (float32, bfloat16, 4-bit). "1 rank" is the default,
which on a CPU computes each batch on as many concurrent MLX streams as the rank has
cores (``--streams``); ``--streams 1`` is the one-stream step, the form before it.

MFU (model FLOPs utilization, PaLM: Chowdhery et al. 2022, appendix B) is the FLOPs a step
must do, divided by its seconds, divided by the machine's peak, here the float32 matmul
rate MLX reaches on a 1024x1024 matmul through OpenBLAS, measured in the same run (best of
the repeats). The FLOPs per step are counted from the step's real rows (padding excluded),
for LoRA on the last k of n layers with a frozen base (PaLM's 6N per token is for full
training; LoRA needs no weight gradients of the frozen matrices):

- forward, every layer, every real token: 2 * N_layer (the layer's matmul parameters)
  plus attention 4 * h * t, h the query width (scores and values against the t tokens
  before it; PaLM counts the full sequence, we count the causal t, which is what any
  kernel must do);
- output layer (the tied 49,152 x 576 embedding) at the scored tokens only, forward
  2 * V * d and backward to the hidden state 2 * V * d;
- backward through the k trained layers: the input gradient of each frozen matmul
  (2 * N_layer per token) and of attention (8 * h * t: twice the forward), plus the LoRA
  matrices (forward and both gradients, 6 * r * (d_in + d_out) per adapted matrix).

Throughput here counts scored tokens per second (the trained tokens, what tools report).

    python benchmarks/real_model.py [--iters 12] [--repeats 2]

Prints the tables and writes results/real_model.json.
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, REPO, env_for, launch, median, run, save, table

from course_lib import metrics

DATA = REPO / "data-sets" / "pirate"


def matmul_peak(repeats: int = 5) -> float:
    """Best GFLOP/s of a 1024x1024 float32 matmul over ``repeats`` fresh processes."""
    rates = []
    for _ in range(repeats):
        _, out = run([PY, "-m", "course_lib.blas", "--matmul"], env=env_for(1))
        rates.append(json.loads(out.strip().splitlines()[-1])["gflops"])
    return max(rates)


def step_flops(iters: int, seed: int = 0, model: str | None = None, batch_size: int = 8,
               full: bool = False) -> list[dict]:
    """FLOPs of each of the first ``iters`` steps of the default recipe (see the module
    docstring) on ``model`` (a folder with SmolLM2's ``config.json`` and tokenizer; default
    the converted SmolLM2), at global batch ``batch_size``; ``full``: a full fine-tune of
    every layer instead (weight gradients too: 6 N per token, the output layer's included,
    PaLM's appendix B). Returns ``[{"flops", "tokens", "scored"}]``, from the batches the
    fine-tune takes."""
    import numpy as np

    from course_lib.data import load_tokenizer
    from course_lib.fine_tune import load_data, parse
    from course_lib.fine_tune.batches import GlobalBatches
    from course_lib.models import resolve

    folder = model or resolve("smollm2:float32")
    plan = parse(["--model", "smollm2", "--seed", str(seed), "--batch-size", str(batch_size)])
    config = json.loads((Path(folder) / "config.json").read_text())
    d, f, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config["head_dim"]  # width of queries and of o's input
    kv = config["num_key_value_heads"] * config["head_dim"]
    vocab, k, r = config["vocab_size"], plan.num_layers, plan.lora_rank
    n_layer = d * q * 2 + d * kv * 2 + d * f * 3  # q, o; k, v; gate, up, down
    lora = r * (2 * (d + q) + 2 * (d + kv) + 2 * (d + f) + (f + d))
    train, _ = load_data(DATA, load_tokenizer(str(folder)), plan)
    batches = GlobalBatches(train, plan.batch_size, plan.seed)
    steps = []
    for _ in range(iters):
        tokens, lengths = batches.next(0, 1, plan.max_seq_length)
        lengths = np.array(lengths)
        t = lengths[:, 1]  # real tokens per row, each an input position
        scored = int((lengths[:, 1] - np.maximum(lengths[:, 0], 1) + 1).sum())
        causal = float((t * (t + 1) / 2).sum())  # sum over positions of the tokens attended
        forward = 2 * n_layer * n_layers * t.sum() + 4 * q * n_layers * causal
        if full:  # input and weight gradients of every layer and of the output layer
            flops = 3 * forward + 6 * vocab * d * scored
        else:
            flops = (forward + 4 * vocab * d * scored  # output layer, forward and backward
                     + 2 * n_layer * k * t.sum() + 8 * q * k * causal  # backward, k layers
                     + 6 * lora * k * t.sum())  # LoRA: forward and both gradients
        steps.append({"flops": float(flops), "tokens": int(t.sum()), "scored": scored})
    return steps


FORWARD = """
import json, sys, time
import mlx.core as mx
from mlx_lm import load
from course_lib.fine_tune.loss import scored_loss
from course_lib.fine_tune.batches import pad_batch
from course_lib.fine_tune.inputs import load_split
from course_lib.models import resolve
model, tokenizer = load(resolve("smollm2:" + sys.argv[1]))
rows, _ = load_split(__import__("pathlib").Path(sys.argv[2]), tokenizer, True, 512)
batch = pad_batch(rows[:4], 512)
mx.eval(scored_loss(model, *batch))
tic = time.perf_counter()
mx.eval(scored_loss(model, *batch))
print(json.dumps({"seconds": time.perf_counter() - tic, "tokens": int(batch[1][:, 1].sum())}))
"""


def forward_seconds(dtype: str) -> dict:
    """Seconds of one forward pass (loss on 4 validation rows) with SmolLM2's weights in
    ``dtype``, in a fresh process: ``{"seconds", "tokens"}``."""
    _, out = run([PY, "-c", FORWARD, dtype, DATA / "valid.jsonl"], env=env_for(1))
    return json.loads(out.strip().splitlines()[-1])


def padding() -> dict:
    """Padded positions per real token of one epoch of the default recipe's global batches,
    with ``pad_batch``'s rule of 32 (compiled steps, mlx_lm's) and of 1 (the default)."""
    from course_lib.data import load_tokenizer
    from course_lib.fine_tune import load_data, parse
    from course_lib.fine_tune.batches import GlobalBatches, pad_batch

    plan = parse(["--model", "smollm2"])
    train, _ = load_data(DATA, load_tokenizer("smollm2:float32"), plan)
    batches = GlobalBatches(train, plan.batch_size, plan.seed).batches
    real = sum(min(len(train[i][0]), plan.max_seq_length) for b in batches for i in b)
    return {str(m): sum(pad_batch([train[i] for i in b], plan.max_seq_length, m)[0].size
                        for b in batches) / real for m in (32, 1)}


def fine_tune(ranks: int, iters: int, out: Path, extra: list) -> dict:
    cmd = [PY, "-m", "course_lib.fine_tune", "--no-progress", "--model", "smollm2:float32",
           "--iters", iters,
           "--steps-per-report", 1, "--steps-per-eval", 10**6, "--val-batches", 1,
           "--save-every", 10**6, "--adapter-path", out, *extra]
    wall, _ = run(launch(ranks, cmd), env=env_for(ranks))
    summary = json.loads((out / "summary.json").read_text())
    train = [m for m in metrics.read(out) if m["split"] == "train"]
    return {"summary": summary, "steps": train, "wall_seconds": wall}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    flops = step_flops(a.iters)
    configs = {  # name: (ranks, options)
        "1 rank": (1, []),
        "1 rank, --streams 1": (1, ["--streams", "1"]),
        "1 rank, --loss all": (1, ["--loss", "all"]),
        "1 rank, --compile": (1, ["--compile"]),
        "2 ranks": (2, []),
        "2 ranks, --step-timing": (2, ["--step-timing"]),
        "1 rank, --step-timing": (1, ["--step-timing"]),
        "1 rank, --streams 1, --step-timing": (1, ["--streams", "1", "--step-timing"]),
    }
    results, peaks = {name: [] for name in configs}, []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            peaks.append(matmul_peak(3))
            names = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for name in names:
                ranks, extra = configs[name]
                out = Path(tmp) / f"{name.replace(' ', '_').replace(',', '')}-{rep}"
                r = fine_tune(ranks, a.iters, out, extra)
                # Steps 2.. (step 1 pays one-time costs); the same steps' FLOPs.
                seconds = sum(m["seconds"] for m in r["steps"][1:])
                step_flop = sum(f["flops"] for f in flops[1:])
                r["gflops"] = step_flop / seconds / 1e9
                r["tokens_per_second"] = sum(m["tokens"] for m in r["steps"][1:]) / seconds
                results[name].append(r)
                print(f"{name} (repeat {rep}): {r['tokens_per_second']:.1f} scored tokens/s, "
                      f"{r['gflops']:.1f} GFLOP/s, peak {r['summary']['peak_memory_gb']:.2f} GB",
                      flush=True)
    peak = max(peaks)
    per_token = sum(f["flops"] for f in flops) / sum(f["scored"] for f in flops)
    rows, summary = [], {}
    for name, runs in results.items():
        tps = median([r["tokens_per_second"] for r in runs])
        gf = median([r["gflops"] for r in runs])
        mem = median([r["summary"]["peak_memory_gb"] for r in runs])
        timed = [r["summary"]["step_seconds"] for r in runs if "step_seconds" in r["summary"]]
        summary[name] = {"tokens_per_second": tps, "gflops": gf, "mfu": gf / peak,
                         "peak_memory_gb": mem,
                         "step_seconds": {k: median([t[k] for t in timed]) for k in timed[0]}
                         if timed else None}
        rows.append([name, tps, gf, gf / peak, mem])
    print(f"\nmatmul peak (1024x1024 float32, best of {3 * a.repeats}): {peak:.1f} GFLOP/s; "
          f"model FLOPs per scored token in these steps: {per_token / 1e9:.3f} GFLOP")
    print(table(["run", "scored tokens/s", "GFLOP/s", "MFU", "peak GB"], rows))
    anatomy = [[name, *(1000 * v for v in s["step_seconds"].values())]
               for name, s in summary.items() if s["step_seconds"]]
    if anatomy:
        phases = list(next(s for s in summary.values() if s["step_seconds"])["step_seconds"])
        print("\nstep anatomy, ms per step:")
        print(table(["run", *phases], anatomy))
    pads = padding()
    print(f"\npadded positions per real token, one epoch of global batches: rule of 32 "
          f"{pads['32']:.3f}, to the longest row {pads['1']:.3f}")
    dtypes = {dtype: forward_seconds(dtype) for dtype in ("float32", "bfloat16", "4bit")}
    print("\none forward pass (loss of 4 validation rows) by the weights' dtype:")
    print(table(["dtype", "seconds", "tokens/s", "x float32"],
                [[k, v["seconds"], v["tokens"] / v["seconds"],
                  v["seconds"] / dtypes["float32"]["seconds"]] for k, v in dtypes.items()]))
    print("saved", save("real_model", {"forward_by_dtype": dtypes, "padding": pads,
        "iters": a.iters, "repeats": a.repeats, "matmul_peak_gflops": peak,
        "matmul_peaks": peaks, "flops_per_step": flops, "summary": summary,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "steps"} for r in v]
                 for k, v in results.items()}}))


if __name__ == "__main__":
    main()
