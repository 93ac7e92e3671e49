"""Peak memory per rank of a LoRA fine-tune, ours against mlx_lm.lora, for the default model
and for models 10x and 100x its size (same architecture and tokenizer, random weights).

Both tools train on the same 16 rows of nearly equal length (see same_work_data), global
batch 8, LoRA rank 8 on every layer, 2 ranks under mpirun.

    python benchmarks/memory.py [--iters 4] [--sizes 1,10,100] [--ranks 2]

Peak memory is MLX's own count (mx.get_peak_memory: bytes its allocator held at most),
the largest over the ranks for ours and rank 0's for mlx_lm.
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, REPO, launch, random_model_folder, run, save, table

from course_lib.tiny_model import ensure_tiny_model

# hidden, layers, intermediate, heads, kv heads -> ~2M (default), ~20M, ~200M parameters
SHAPES = {1: None, 10: (512, 6, 1536, 8, 4), 100: (1024, 12, 4096, 16, 8)}


def scaled_model(factor: int, folder: Path) -> Path:
    """The default model's folder, or a random-weight copy of its architecture ~factor x."""
    base = ensure_tiny_model()
    if SHAPES[factor] is None:
        return base
    hidden, layers, inter, heads, kv = SHAPES[factor]
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                  num_attention_heads=heads, num_key_value_heads=kv)
    return random_model_folder(config, base, folder / f"x{factor}", seed=factor)


def same_work_data(folder: Path, rows: int = 16) -> Path:
    """A data folder whose train split is the ``rows`` sample rows nearest the median length.

    Peak memory follows the longest padded batch a run meets, and the two tools visit rows
    in different orders (ours sorts by length; mlx_lm 0.32's sort key is a no-op, so its
    batches mix lengths). Rows of nearly one length make every batch the same work for both.
    """
    lines = (REPO / "data-sets" / "pirate" / "train.jsonl").read_text().splitlines()
    by_length = sorted(lines, key=len)
    middle = len(by_length) // 2
    chosen = by_length[middle - rows // 2: middle + rows - rows // 2]
    out = folder / "same_work"
    out.mkdir()
    (out / "train.jsonl").write_text("\n".join(chosen) + "\n")
    (out / "valid.jsonl").write_text("\n".join(chosen[:8]) + "\n")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--sizes", default="1,10,100")
    p.add_argument("--ranks", type=int, default=2)
    a = p.parse_args()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = same_work_data(tmp)
        for factor in [int(f) for f in a.sizes.split(",")]:
            model = scaled_model(factor, tmp)
            params = json.loads((model / "config.json").read_text())
            ours_out = tmp / f"ours{factor}"
            run(launch(a.ranks, [PY, "-m", "course_lib.fine_tune", "--no-progress", "--model",
                                 model, "--iters", a.iters, "--num-layers", -1,
                                 "--steps-per-eval", 10**6, "--val-batches", 1,
                                 "--save-every", 10**6, "--data", data,
                                 "--adapter-path", ours_out]))
            ours = json.loads((ours_out / "summary.json").read_text())["peak_memory_gb"]
            cfg = tmp / "lora.yaml"
            cfg.write_text("lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0}\n")
            theirs_out = tmp / f"theirs{factor}"
            theirs_out.mkdir()
            run(launch(a.ranks, [PY, REPO / "benchmarks" / "mlx_lm_lora_driver.py",
                                 theirs_out / "r.jsonl", "--", "--model", model, "--data",
                                 data, "--iters", a.iters,
                                 "--batch-size", 8, "--learning-rate", 5e-4,
                                 "--num-layers", params["num_hidden_layers"],
                                 "--steps-per-eval", 10**6, "--val-batches", 1,
                                 "--save-every", 10**6, "--max-seq-length", 512,
                                 "--adapter-path", theirs_out / "a", "-c", cfg]))
            last = [json.loads(x) for x in (theirs_out / "r.jsonl").read_text().splitlines()][-1]
            theirs = last["peak_memory_gb"]
            results[factor] = {"ours_gb": ours, "mlx_lm_gb": theirs, "ratio": ours / theirs,
                               "config": {k: params[k] for k in ("hidden_size",
                                          "num_hidden_layers", "intermediate_size")}}
            rows.append([f"{factor}x", ours, theirs, ours / theirs])
            print(rows[-1], flush=True)
    print(table(["model", "ours GB", "mlx_lm GB", "ours/mlx_lm"], rows))
    print("saved", save("memory", {"iters": a.iters, "ranks": a.ranks, "results": results}))


if __name__ == "__main__":
    main()
