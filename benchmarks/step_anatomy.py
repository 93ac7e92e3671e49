"""Where a training step's time goes, at 1 and 2 ranks (mpirun), and the serial fraction.

Runs the default fine-tune with --step-timing, which evaluates MLX's lazy graph between
phases: data (batch fetch and padding), forward+backward, all-reduce (the gradient
averaging, including any wait for the slowest rank), optimizer. The serial fraction for
Amdahl's law is the part of a 1-rank step that more ranks do not shrink: the optimizer
(every rank repeats it) plus the all-reduce measured at 2 ranks.

    python benchmarks/step_anatomy.py [--iters 60] [--all-reduce auto|plain|bucketed]
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, launch, run, save, table

PHASES = ["data", "forward_backward", "all_reduce", "optimizer"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--all-reduce", default="auto")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2):
            out = Path(tmp) / str(ranks)
            run(launch(ranks, [PY, "-m", "course_lib.fine_tune", "--no-progress",
                               "--step-timing", "--iters", a.iters, "--steps-per-eval", 10**6,
                               "--val-batches", 1, "--save-every", 10**6,
                               "--all-reduce", a.all_reduce, "--adapter-path", out]))
            s = json.loads((out / "summary.json").read_text())
            results[ranks] = {**s["step_seconds"], "step": sum(s["step_seconds"].values()),
                              "tokens_per_second": s["tokens_per_second"],
                              "all_reduce_mode": s["all_reduce"]}
    one, two = results[1], results[2]
    serial = (one["optimizer"] + two["all_reduce"]) / one["step"]
    share = two["all_reduce"] / two["step"]
    print(table(["ranks", *PHASES, "step s", "tokens/s"],
                [[r, *[v[k] for k in PHASES], v["step"], v["tokens_per_second"]]
                 for r, v in results.items()]))
    print(f"serial fraction s = {serial:.4f}; gradient averaging = {100 * share:.1f}% of the "
          f"2-rank step ({two['all_reduce_mode']}); step speed-up {one['step'] / two['step']:.2f}x")
    print("saved", save("step_anatomy", {"iters": a.iters, "results": results,
                                         "serial_fraction": serial,
                                         "all_reduce_share_2_ranks": share}))


if __name__ == "__main__":
    main()
