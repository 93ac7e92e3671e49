"""Training throughput and matmul speed with the mlx-cpu wheel's reference BLAS and with the
OpenBLAS the course's entry points choose, measured in the same run.

    python benchmarks/blas.py [--iters 10]

Linux only (on macOS MLX uses Accelerate and there is nothing to switch).
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, blas, child_env, median, run, save, table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if blas.preload_path() is None:
        raise SystemExit(f"nothing to compare here: {blas.report()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in [("reference (wheel)", {"COURSE_LIB_FAST_BLAS": "0"}),
                            ("OpenBLAS (course default)", {})]:
            env = child_env(**extra)
            env.pop("LD_PRELOAD", None)  # let the entry point decide, as a user's shell would
            matmul = [json.loads(run([PY, "-m", "course_lib.blas", "--matmul"], env=env)[1]
                                 .strip().splitlines()[-1]) for _ in range(a.repeats)]
            out = Path(tmp) / name.split()[0]
            run([PY, "-m", "course_lib.fine_tune", "--no-progress", "--iters", a.iters,
                 "--steps-per-eval", 10**6, "--val-batches", 1, "--save-every", 10**6,
                 "--adapter-path", out], env=env)
            summary = json.loads((out / "summary.json").read_text())
            results[name] = {"matmul_seconds": median([m["seconds"] for m in matmul]),
                             "matmul_gflops": median([m["gflops"] for m in matmul]),
                             "libraries": matmul[0]["libraries"],
                             "train_tokens_per_second": summary["tokens_per_second"]}
            print(name, results[name], flush=True)
    ref, fast = results["reference (wheel)"], results["OpenBLAS (course default)"]
    rows = [[k, v["matmul_seconds"], v["matmul_gflops"], v["train_tokens_per_second"]]
            for k, v in results.items()]
    rows.append(["speed-up", ref["matmul_seconds"] / fast["matmul_seconds"],
                 fast["matmul_gflops"] / ref["matmul_gflops"],
                 fast["train_tokens_per_second"] / ref["train_tokens_per_second"]])
    print(table(["BLAS", "1024^2 matmul s", "GFLOP/s", "train tokens/s"], rows))
    print("saved", save("blas", {"iters": a.iters, "results": results,
                                 "training_speedup": rows[-1][3], "matmul_speedup": rows[-1][1]}))


if __name__ == "__main__":
    main()
