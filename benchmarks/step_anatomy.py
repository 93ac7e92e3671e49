"""Where a training step's time goes, at 1 and 2 ranks (mpirun), and the serial fraction.

Runs the default fine-tune with --step-timing, which evaluates MLX's lazy graph between
phases: data (batch fetch and padding), forward+backward, wait (a barrier: waiting for the
slower rank), all-reduce (the gradient averaging alone), optimizer. The serial fraction for
Amdahl's law is the part of a 1-rank step that more ranks do not shrink: the optimizer
(every rank repeats it) plus the all-reduce measured at 2 ranks.

Each is measured with the step compiled (mx.compile) and op by op (--no-compile), which
shows what compiling buys; the serial fraction comes from the form fine_tune picks by
default on this device (fine_tune.compile_by_default).

    python benchmarks/step_anatomy.py [--iters 60] [--all-reduce auto|plain|bucketed]
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import PY, launch, run, save, table

from course_lib.fine_tune import compile_by_default

PHASES = ["data", "forward_backward", "wait", "all_reduce", "optimizer"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--all-reduce", default="auto")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Compiled (the default) and op by op, at 1 and 2 ranks: what mx.compile buys.
        for compiled in (True, False):
            for ranks in (1, 2):
                key = f"{ranks} {'compiled' if compiled else 'not compiled'}"
                out = Path(tmp) / key.replace(" ", "-")
                run(launch(ranks, [PY, "-m", "course_lib.fine_tune", "--no-progress", "--model", "tiny",
                                   "--step-timing", "--iters", a.iters,
                                   "--steps-per-eval", 10**6, "--val-batches", 1,
                                   "--save-every", 10**6, "--all-reduce", a.all_reduce,
                                   "--compile" if compiled else "--no-compile",
                                   "--adapter-path", out]))
                s = json.loads((out / "summary.json").read_text())
                results[key] = {**s["step_seconds"], "step": sum(s["step_seconds"].values()),
                                "tokens_per_second": s["tokens_per_second"],
                                "ranks": ranks, "compiled": compiled,
                                "all_reduce_mode": s["all_reduce"]}
                print(key, results[key], flush=True)
    default = "compiled" if compile_by_default() else "not compiled"
    one, two = results[f"1 {default}"], results[f"2 {default}"]
    serial = (one["optimizer"] + two["all_reduce"]) / one["step"]
    share = two["all_reduce"] / two["step"]
    wait_share = two["wait"] / two["step"]
    print(table(["ranks", *PHASES, "step s", "tokens/s"],
                [[k, *[v[k2] for k2 in PHASES], v["step"], v["tokens_per_second"]]
                 for k, v in results.items()]))
    compile_gain = {r: results[f"{r} compiled"]["tokens_per_second"]
                    / results[f"{r} not compiled"]["tokens_per_second"] for r in (1, 2)}
    print(f"default ({default}): serial fraction s = {serial:.4f}; gradient averaging = "
          f"{100 * share:.1f}% of the 2-rank step ({two['all_reduce_mode']}), waiting for the "
          f"slower rank {100 * wait_share:.1f}%; step speed-up {one['step'] / two['step']:.2f}x;"
          f" mx.compile: {compile_gain[1]:.2f}x at 1 rank, {compile_gain[2]:.2f}x at 2")
    print("saved", save("step_anatomy", {"iters": a.iters, "results": results,
                                         "serial_fraction": serial,
                                         "default": default,
                                         "all_reduce_share_2_ranks": share,
                                         "wait_share_2_ranks": wait_share,
                                         "compile_speedup": compile_gain}))


if __name__ == "__main__":
    main()
