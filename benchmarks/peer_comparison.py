"""course_lib.fine_tune against mlx_lm.lora (the same installed mlx_lm) on the same work.

Same model (``--model tiny``, the default, or ``smollm2``), sample data, global batch, LoRA
settings (rank 8, scale 20, dropout 0; all 4 layers of the tiny model, the last 8 of
SmolLM2's with the loss on the answers only), learning rate, iterations and seed; at 1 rank
and at 2 ranks (mpirun, or mlx.launch with --launcher mlx.launch).
The two tools train the same thing (the same loss on the same rows) with different amounts
of computation: ours scores logits only where a token counts (``--loss scored``) and pads a
batch to its longest row, sorted by length; mlx_lm 0.32 computes every position's logits
and pads to a multiple of 32 rows in file order (see benchmarks/README.md). That difference
is what the ratio measures.
Runs alternate (ours, theirs, theirs, ours, ...) so drifting machine load hits both, and
both get the same BLAS (OpenBLAS preloaded) and OPENBLAS_NUM_THREADS = cores / ranks.

Throughput is training tokens (target tokens, padding excluded) per second of training
steps, as each tool reports it (validation and model loading excluded); wall time covers
the whole command. Prints a table and writes results/peer_comparison.json.

    python benchmarks/peer_comparison.py [--model tiny|smollm2] [--iters 60] [--repeats 3]
                                         [--ranks 1,2] [--launcher mpirun|mlx.launch]
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, REPO, env_for, launch, median, run, save, table

from course_lib.models import resolve

DATA = REPO / "data-sets" / "pirate"


# The work both tools do, per model: LoRA rank 8, scale 20, dropout 0, global batch 8, Adam at
# 5e-4, seed 0, sequences up to 512 tokens; the tiny model on all 4 layers, SmolLM2 (the
# course's recipe) on its last 8 with the loss on the answers only.
WORK = {
    "tiny": {"num_layers": 4, "mask_prompt": False},
    "smollm2": {"num_layers": 8, "mask_prompt": True},
}


def ours(ranks: int, iters: int, out: Path, model: str, launcher: str = "mpirun") -> dict:
    work = WORK[model]
    cmd = [PY, "-m", "course_lib.fine_tune", "--no-progress", "--model", model, "--iters", iters,
           "--batch-size", 8, "--learning-rate", 5e-4, "--lora-rank", 8, "--lora-scale", 20,
           "--num-layers", work["num_layers"], "--steps-per-report", 10, "--steps-per-eval", 10**6,
           "--val-batches", 1, "--save-every", 10**6, "--max-seq-length", 512, "--seed", 0,
           "--mask-prompt" if work["mask_prompt"] else "--no-mask-prompt", "--adapter-path", out]
    wall, _ = run(launch(ranks, cmd, launcher), env=env_for(ranks))
    s = json.loads((out / "summary.json").read_text())
    return {"tokens_per_second": s["tokens_per_second"], "wall_seconds": wall,
            "final_train_loss": s["final_train_loss"], "peak_memory_gb": s["peak_memory_gb"]}


def theirs(ranks: int, iters: int, out: Path, model: str, launcher: str = "mpirun") -> dict:
    work = WORK[model]
    config = out / "lora.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text("lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0}\n")
    cmd = [PY, REPO / "benchmarks" / "mlx_lm_lora_driver.py", out / "reports.jsonl", "--",
           "--model", resolve(model), "--data", DATA, "--iters", iters, "--batch-size", 8,
           "--learning-rate", 5e-4, "--num-layers", work["num_layers"], "--steps-per-report", 10,
           "--steps-per-eval", 10**6, "--val-batches", 1, "--save-every", 10**6,
           "--max-seq-length", 512, "--seed", 0, "--adapter-path", out / "adapters",
           "-c", config, *(["--mask-prompt"] if work["mask_prompt"] else [])]
    wall, _ = run(launch(ranks, cmd, launcher), env=env_for(ranks))
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    train = [r for r in reports if r.get("split") == "train"]
    tokens = train[-1]["trained_tokens"]
    seconds = sum((b["trained_tokens"] - a) / b["tokens_per_second"]
                  for a, b in zip([0] + [r["trained_tokens"] for r in train], train))
    return {"tokens_per_second": tokens / seconds, "wall_seconds": wall,
            "final_train_loss": train[-1]["train_loss"],
            "peak_memory_gb": max(r["peak_memory"] for r in train)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--model", choices=list(WORK), default="tiny",
                   help="tiny (the 2M test model) or smollm2 (the course's model; results go "
                   "to results/peer_comparison_smollm2.json)")
    p.add_argument("--launcher", choices=["mpirun", "mlx.launch"], default="mpirun",
                   help="how 2+ ranks start: mpirun (MPI backend) or mlx.launch (ring backend); "
                   "results go to results/peer_comparison[_mlx_launch].json")
    a = p.parse_args()
    resolve(a.model)  # built before the timed runs
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [int(r) for r in a.ranks.split(",")]:
            pairs = []
            for i in range(a.repeats):
                order = ["ours", "theirs"] if i % 2 == 0 else ["theirs", "ours"]
                pair = {}
                for tool in order:
                    out = Path(tmp) / f"{tool}-{ranks}-{i}"
                    pair[tool] = (ours(ranks, a.iters, out, a.model, a.launcher) if tool == "ours"
                                  else theirs(ranks, a.iters, out, a.model, a.launcher))
                    print(f"ranks {ranks} repeat {i} {tool}: "
                          f"{pair[tool]['tokens_per_second']:.0f} tokens/s, "
                          f"{pair[tool]['wall_seconds']:.1f} s", flush=True)
                pair["ratio"] = pair["ours"]["tokens_per_second"] / pair["theirs"]["tokens_per_second"]
                pairs.append(pair)
            results[str(ranks)] = {
                "pairs": pairs,
                "median_ratio": median([q["ratio"] for q in pairs]),
                **{f"{tool}_median_{k}": median([q[tool][k] for q in pairs])
                   for tool in ("ours", "theirs")
                   for k in ("tokens_per_second", "wall_seconds", "final_train_loss",
                             "peak_memory_gb")},
            }
    rows = [[r, v["ours_median_tokens_per_second"], v["theirs_median_tokens_per_second"],
             v["median_ratio"], v["ours_median_wall_seconds"], v["theirs_median_wall_seconds"],
             v["ours_median_final_train_loss"], v["theirs_median_final_train_loss"],
             v["ours_median_peak_memory_gb"], v["theirs_median_peak_memory_gb"]]
            for r, v in results.items()]
    print(table(["ranks", "ours tok/s", "mlx_lm tok/s", "ours/theirs", "ours wall s",
                 "mlx_lm wall s", "ours loss", "mlx_lm loss", "ours GB", "mlx_lm GB"], rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = [int(r) for r in results]
    for tool, label in [("ours", "course_lib.fine_tune"), ("theirs", "mlx_lm.lora")]:
        ax.plot(ranks, [results[str(r)][f"{tool}_median_tokens_per_second"] for r in ranks],
                "o-", label=label)
    ax.set_xticks(ranks)
    ax.set_xlabel(f"ranks ({a.launcher}, one machine)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("training tokens/s (median)")
    ax.set_title(f"LoRA fine-tune of the {a.model} model")
    ax.legend()
    fig.tight_layout()
    suffix = ("" if a.launcher == "mpirun" else "_mlx_launch") + (
        "" if a.model == "tiny" else f"_{a.model}")
    fig.savefig(REPO / "benchmarks" / "results" / f"tokens_per_second{suffix}.png", dpi=100)
    print("saved", save(f"peer_comparison{suffix}", {"model": a.model, "launcher": a.launcher,
                                                     "iters": a.iters,
                                                     "repeats": a.repeats, "results": results}))


if __name__ == "__main__":
    main()
