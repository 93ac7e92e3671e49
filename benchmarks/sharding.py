"""Memory per rank and bytes per step of a full fine-tune with Adam under data parallelism,
FSDP and tensor parallelism at 2 ranks, for three model sizes: the tiny model, SmolLM2-135M,
and a random-weight llama of ~330M parameters that data parallelism cannot hold within a
memory limit while FSDP and tensor parallelism can.

    python benchmarks/sharding.py [--iters 3] [--models tiny,smollm2,llama-330m]
                                  [--limit-gb 3.5]

Each run is ``python -m course_lib.fine_tune --fine-tune-type full --num-layers -1`` under
``mpirun -np 2 --mca btl self,tcp`` (MPI over TCP on localhost, so its bytes can be read
off the sockets) through ``benchmarks/sharding_worker.py``, which enforces the memory limit
(``mx.set_memory_limit`` plus a watch on MLX's active memory: this CPU build does not
enforce the limit itself) and reads the kernel's TCP counters around every step. Global
batch 4 rows of 64 tokens (the pirate rows truncated to 64, all tokens trained), seed 0.

Columns: peak GB per rank (``mx.get_peak_memory``, the larger of the two ranks, before
the final save, and with it: rank 0 gathers the whole trained arrays to write them in
``mlx_lm``'s format), the prediction of ``course_lib.memory.estimate``, and ZeRO's / Megatron's
arithmetic (weights + gradients + Adam = 16 bytes per trained parameter held, 4 per frozen
one, no activations); MB sent per step per rank: counted (the collectives the step builds,
with ring-algorithm factors), on the wire (TCP bytes acknowledged), and the textbook
formula (``course_lib.memory.collective_bytes``).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import PY, REPO, save, table

from course_lib import memory
from course_lib.launch import child_env, mpirun_command
from course_lib.models import cache_dir, resolve

MODES = ("none", "fsdp", "tensor")
LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 2816,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64}
ARGS = ["--fine-tune-type", "full", "--num-layers", "-1", "--batch-size", "4",
        "--max-seq-length", "64", "--no-mask-prompt", "--steps-per-report", "1",
        "--steps-per-eval", "1000", "--val-batches", "1", "--save-every", "1000",
        "--seed", "0", "--no-progress"]


def large_model() -> Path:
    """A llama with SmolLM2's tokenizer and vocabulary and :data:`LARGE`'s shape, random
    weights (seed 0), float32; built once into the course's model cache (1.4 GB)."""
    out = cache_dir() / "bench-llama-330m-v1"
    if (out / "config.json").exists():
        return out
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    base = Path(resolve("smollm2"))
    config = json.loads((base / "config.json").read_text())
    config.update(LARGE)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    save_model(tmp, model)
    save_config(config, tmp / "config.json")
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def model_folder(name: str) -> Path:
    return large_model() if name == "llama-330m" else Path(resolve(name))


def run_mode(folder: Path, mode: str, iters: int, out: Path, limit_gb: float) -> dict:
    work = out / mode
    work.mkdir(parents=True)
    cmd = mpirun_command(2, "--mca", "btl", "self,tcp", PY,
                         REPO / "benchmarks" / "sharding_worker.py", work,
                         "--model", folder, "--sharding", mode, "--iters", iters,
                         "--adapter-path", work / "run", *ARGS)
    import subprocess

    env = child_env(SHARDING_LIMIT_GB=str(limit_gb or 0))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=1800)
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)
             if (work / f"rank{r}.json").exists()]
    over = [r for r in ranks if r["over_limit"]]
    if over:
        return {"fits": False, "active_gb_at_stop": max(r["active_gb_at_stop"] for r in over),
                "steps_done": min(r["steps_done"] for r in over)}
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} on {folder} exited {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    summary = json.loads((work / "run" / "summary.json").read_text())
    steps = [s for r in ranks for s in r["steps"][1:]]  # the first step warms up
    return {"fits": True, "peak_gb": max(summary["peak_memory_gb_per_rank"]),
            "peak_gb_with_save": max(r["peak_gb_at_exit"] for r in ranks),
            "peak_gb_per_rank": summary["peak_memory_gb_per_rank"],
            "counted_bytes": summary["collective_bytes_per_step"]["sent_bytes"],
            "counted": summary["collective_bytes_per_step"],
            "wire_bytes": sum(s["sent"] for s in steps) / max(len(steps), 1),
            "step_seconds": sum(s["seconds"] for s in steps) / max(len(steps), 1),
            "final_train_loss": summary["final_train_loss"], "sharding": summary["sharding"]}


def arithmetic(config: dict, mode: str, ranks: int) -> float:
    """ZeRO's / Megatron's bytes per rank: 16 per trained parameter held, 4 per frozen."""
    e = memory.estimate(config, mode, ranks, ranks, 2, fine_tune_type="full", num_layers=-1)
    trained_held = e.adam / 8
    return e.weights + 8 * trained_held + 4 * trained_held


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--models", default="tiny,smollm2,llama-330m")
    p.add_argument("--limit-gb", type=float, default=3.5,
                   help="memory limit per rank for llama-330m (1e9 bytes)")
    a = p.parse_args()
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            folder = model_folder(name)
            config = json.loads((folder / "config.json").read_text())
            limit = a.limit_gb if name == "llama-330m" else 0
            params = memory.parameter_counts(config)["total"]
            for mode in MODES:
                print(f"== {name} {mode}", flush=True)
                r = run_mode(folder, mode, a.iters, Path(tmp) / name, limit)
                e = memory.estimate(config, mode, 2, 4, 64, fine_tune_type="full",
                                    num_layers=-1)
                t = memory.collective_bytes(config, mode, 2, 4, 64, fine_tune_type="full",
                                            num_layers=-1)
                r.update(predicted_gb=e.total / 1e9, arithmetic_gb=arithmetic(config, mode, 2)
                         / 1e9, formula_bytes=t["formula"], as_built_bytes=t["as_built"],
                         limit_gb=limit or None, parameters=params, estimate=e.as_dict())
                results[f"{name}/{mode}"] = r
                measured = f"{r['peak_gb']:.3f}" if r["fits"] else \
                    f"> {limit:g} (stopped at {r['active_gb_at_stop']:.2f})"
                rows.append([name, f"{params / 1e6:.1f}M", mode, measured,
                             f"{r['peak_gb_with_save']:.3f}" if r["fits"] else "-",
                             f"{r['predicted_gb']:.3f}", f"{r['arithmetic_gb']:.3f}",
                             f"{r['counted_bytes'] / 1e6:.1f}" if r["fits"] else "-",
                             f"{r['wire_bytes'] / 1e6:.1f}" if r["fits"] else "-",
                             f"{r['formula_bytes'] / 1e6:.1f}",
                             f"{r['step_seconds']:.1f}" if r["fits"] else "-"])
    print(table(["model", "params", "mode", "peak GB/rank", "with save", "predicted",
                 "16B/param",
                 "MB sent counted", "MB on wire", "MB formula", "s/step"], rows))
    path = save("sharding", {"iters": a.iters, "ranks": 2, "args": ARGS,
                             "limit_gb": a.limit_gb, "large_model": LARGE, "results": results})
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
