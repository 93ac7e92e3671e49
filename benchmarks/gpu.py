"""The course's fine-tune on an NVIDIA GPU (MLX's CUDA build): throughput, model FLOPs
utilization against the GPU's measured matmul peak, compiled against not, and what
``mlx_lm lora`` does on the same GPU.

The model is SmolLM2-135M's architecture (its ``config.json`` and tokenizer, from a folder
given with ``--model-folder``) with random weights: the speed of a step does not depend on
the weights' values, and a machine without a package registry can build it. FLOPs per step
as ``benchmarks/real_model.py`` counts them (PaLM's appendix B, adapted to LoRA).

    python benchmarks/gpu.py --model-folder DIR [--iters 30]

Prints the tables and writes results/gpu.json. Every run keeps MLX's memory limit at
``--memory-limit-gb`` (default 40) and reports its peak.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PY, REPO, blas, random_model_folder, save, table

DATA = REPO / "data-sets" / "pirate"


def matmul_peak(dtype: str, n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul in MLX on the GPU (median of ``repeats``)."""
    return blas.time_matmul(n, repeats, dtype)["gflops"] / 1e3


def random_model(source: Path, out: Path, dtype: str) -> Path:
    """SmolLM2's architecture from ``source`` with random weights in ``dtype``, saved as
    a model folder ``mlx_lm.load`` reads."""
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return random_model_folder(config, source, out, seed=0, dtype=dtype)


WORKER = """
import sys
import mlx.core as mx
mx.set_memory_limit(int(float(sys.argv[1]) * 2**30))
sys.argv = [sys.argv[0], *sys.argv[2:]]
from course_lib.fine_tune.cli import main
sys.exit(main())
"""


def fine_tune(model: Path, out: Path, options: list, limit_gb: float) -> dict:
    cmd = [PY, "-c", WORKER, str(limit_gb), "--no-progress", "--model", str(model),
           "--data", str(DATA), "--adapter-path", str(out), "--steps-per-eval", "100000",
           "--val-batches", "1", "--save-every", "100000", *map(str, options)]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    s = json.loads((out / "summary.json").read_text())
    return {"tokens_per_second": s["tokens_per_second"], "train_seconds": s["train_seconds"],
            "peak_memory_gb": s["peak_memory_gb"], "compiled": s["compiled"],
            "final_train_loss": s["final_train_loss"], "wall_seconds": time.perf_counter() - tic}


def mlx_lm_lora(model: Path, out: Path, iters: int) -> dict:
    """``mlx_lm lora`` with the same LoRA on the same data; its output's tail on failure."""
    config = out / "lora.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text("lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0}\n")
    cmd = [PY, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(DATA),
           "--iters", str(iters), "--batch-size", "8", "--num-layers", "8", "--mask-prompt",
           "--learning-rate", "5e-4", "--steps-per-report", str(iters), "--steps-per-eval",
           "100000", "--val-batches", "1", "--adapter-path", str(out / "adapters"), "-c",
           str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)  # mlx_lm 0.32 colours its output
    rates = [float(m.replace(",", "")) for m in
             re.findall(r"Tokens/sec[ :]+([0-9.,]+)", plain, flags=re.IGNORECASE)]
    return {"returncode": proc.returncode, "tokens_per_second": rates[-1] if rates else None,
            "tail": re.sub(r"\x1b\[[0-9;]*m", "", proc.stderr + proc.stdout)[-1500:]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-folder", type=Path, required=True,
                   help="a folder with SmolLM2's config.json and tokenizer files")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--memory-limit-gb", type=float, default=40.0)
    a = p.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import mlx.core as mx

    from real_model import step_flops

    peaks = {dtype: matmul_peak(dtype) for dtype in ("bfloat16", "float32")}
    print("matmul peak, 8192^3 on the GPU: " + ", ".join(f"{k} {v:.0f} TFLOP/s"
                                                          for k, v in peaks.items()))
    lora = ["--num-layers", 8, "--lora-rank", 8, "--learning-rate", 5e-4, "--mask-prompt",
            "--steps-per-report", 10]
    full = ["--fine-tune-type", "full", "--num-layers", -1, "--learning-rate", 1e-5,
            "--mask-prompt", "--steps-per-report", 10]
    long = 5 * a.iters
    configs = {  # name: (weights dtype, options, global batch, full fine-tune, steps)
        "LoRA, batch 8, float32": ("float32", [*lora, "--batch-size", 8, "--no-compile"], 8, False, a.iters),
        "LoRA, batch 8, float32, compiled": ("float32", [*lora, "--batch-size", 8, "--compile"], 8, False, a.iters),
        f"LoRA, batch 8, float32, {long} steps": ("float32", [*lora, "--batch-size", 8, "--no-compile"], 8, False, long),
        f"LoRA, batch 8, float32, compiled, {long} steps": ("float32", [*lora, "--batch-size", 8, "--compile"], 8, False, long),
        "LoRA, batch 8, bfloat16": ("bfloat16", [*lora, "--batch-size", 8, "--no-compile"], 8, False, a.iters),
        "LoRA, batch 64, bfloat16": ("bfloat16", [*lora, "--batch-size", 64, "--no-compile"], 64, False, a.iters),
        "LoRA, batch 64, bfloat16, compiled": ("bfloat16", [*lora, "--batch-size", 64, "--compile"], 64, False, a.iters),
        "full, batch 32, bfloat16": ("bfloat16", [*full, "--batch-size", 32, "--no-compile"], 32, True, a.iters),
        "full, batch 32, bfloat16, compiled": ("bfloat16", [*full, "--batch-size", 32, "--compile"], 32, True, a.iters),
    }
    gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    results = {"device": gpus or str(mx.default_device()), "matmul_peak_tflops": peaks,
               "runs": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {dtype: random_model(a.model_folder, Path(tmp) / f"model-{dtype}", dtype)
                  for dtype in ("float32", "bfloat16")}
        for name, (dtype, options, batch, is_full, iters) in configs.items():
            r = fine_tune(models[dtype], Path(tmp) / name.replace(" ", "_").replace(",", ""),
                          [*options, "--iters", iters], a.memory_limit_gb)
            if "error" not in r:
                flops = step_flops(iters, model=str(a.model_folder), batch_size=batch,
                                   full=is_full)
                scored = sum(f["scored"] for f in flops)
                r["tflops"] = sum(f["flops"] for f in flops) / r["train_seconds"] / 1e12
                r["mfu"] = r["tflops"] / peaks[dtype]
                r["scored_tokens"] = scored
            results["runs"][name] = r
            print(name, json.dumps(r)[:600], flush=True)
            rows.append([name, r.get("tokens_per_second"), r.get("tflops"), r.get("mfu"),
                         r.get("peak_memory_gb"), "ok" if "error" not in r else "failed"])
        results["mlx_lm_lora"] = mlx_lm_lora(models["float32"], Path(tmp) / "mlx_lm", a.iters)
        print("mlx_lm lora:", json.dumps(results["mlx_lm_lora"])[:1500], flush=True)
    print(table(["run", "trained tokens/s", "TFLOP/s", "MFU", "peak GB", ""], rows))
    print("saved", save("gpu", results))


if __name__ == "__main__":
    main()
