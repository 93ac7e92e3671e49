"""Training throughput and matmul speed with the mlx-cpu wheel's reference BLAS and with the
OpenBLAS the course's entry points choose, measured in the same run.

Both sides run the default fine-tune (1 rank, the same seed, so the same batches) and a
1024x1024 float32 matmul, alternating, ``--repeats`` times; the table shows medians.

    python benchmarks/blas.py [--iters 16] [--repeats 3]

Linux only (on macOS MLX uses Accelerate and there is nothing to switch).
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, blas, child_env, median, run, save, table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if blas.preload_path() is None:
        raise SystemExit(f"nothing to compare here: {blas.report()}")
    names = {"reference (wheel)": {"COURSE_LIB_FAST_BLAS": "0"}, "OpenBLAS (course default)": {}}
    envs = {}
    for name, extra in names.items():
        envs[name] = child_env(**extra)
        envs[name].pop("LD_PRELOAD", None)  # let the entry point decide, as a user's shell would
    matmul = {n: [] for n in names}
    train = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            # Alternate the order, so a drift in the machine's load hits both alike.
            for name in (list(names) if i % 2 == 0 else list(names)[::-1]):
                matmul[name].append(json.loads(
                    run([PY, "-m", "course_lib.blas", "--matmul"], env=envs[name])[1]
                    .strip().splitlines()[-1]))
                out = Path(tmp) / f"{name.split()[0]}-{i}"
                run([PY, "-m", "course_lib.fine_tune", "--no-progress", "--model", "tiny", "--iters", a.iters,
                     "--steps-per-eval", 10**6, "--val-batches", 1, "--save-every", 10**6,
                     "--adapter-path", out], env=envs[name])
                summary = json.loads((out / "summary.json").read_text())
                train[name].append(summary["tokens_per_second"])
                print(f"repeat {i} {name}: matmul {matmul[name][-1]['seconds']:.4f} s, "
                      f"training {train[name][-1]:.0f} tokens/s", flush=True)
    results = {n: {"matmul_seconds": median([m["seconds"] for m in matmul[n]]),
                   "matmul_gflops": median([m["gflops"] for m in matmul[n]]),
                   "libraries": matmul[n][0]["libraries"],
                   "train_tokens_per_second": median(train[n]),
                   "train_tokens_per_second_runs": train[n]} for n in names}
    ref, fast = results["reference (wheel)"], results["OpenBLAS (course default)"]
    rows = [[k, v["matmul_seconds"], v["matmul_gflops"], v["train_tokens_per_second"]]
            for k, v in results.items()]
    rows.append(["speed-up", ref["matmul_seconds"] / fast["matmul_seconds"],
                 fast["matmul_gflops"] / ref["matmul_gflops"],
                 fast["train_tokens_per_second"] / ref["train_tokens_per_second"]])
    print(table(["BLAS", "1024^2 matmul s", "GFLOP/s", "train tokens/s"], rows))
    print("saved", save("blas", {"iters": a.iters, "repeats": a.repeats, "results": results,
                                 "training_speedup": rows[-1][3], "matmul_speedup": rows[-1][1]}))


if __name__ == "__main__":
    main()
