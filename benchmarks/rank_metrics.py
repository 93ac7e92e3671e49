"""What the per-rank dashboard costs: the all_gather per report, and the step timing.

Two measurements at 2 ranks on the tiny model, reporting every step:

1. The gather: every train record of metrics.jsonl holds ``gather_seconds``, rank 0's time
   for the one ``all_gather`` of every rank's numbers at that report (after the report's
   all_sum, so the ranks arrive together and it is the call's own cost). Median and 90th
   percentile over the reports, under mpirun (MPI) and mlx.launch (ring).
2. The timing: training tokens per second with the default per-rank timing (an evaluation
   after forward+backward and after the all-reduce, no barrier), with ``--no-rank-timing``
   (one evaluation per step, no per-rank phase times) and with ``--step-timing`` (every
   phase evaluated, plus a barrier). Runs interleaved, ``--repeats`` of each, medians.

    python benchmarks/rank_metrics.py [--iters 60] [--repeats 3]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import PY, launch, run, save, table

MODES = {"--rank-timing (default)": ["--rank-timing"], "--no-rank-timing": ["--no-rank-timing"],
         "--step-timing": ["--step-timing"]}


def fine_tune(out: Path, iters: int, extra: list, launcher: str = "mpirun") -> tuple[dict, list]:
    run(launch(2, [PY, "-m", "course_lib.fine_tune", "--no-progress", "--model", "tiny",
                   "--iters", iters, "--steps-per-report", 1, "--steps-per-eval", 10**6,
                   "--val-batches", 1, "--save-every", 10**6, "--adapter-path", out, *extra],
               launcher=launcher))
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in records if r["split"] == "train"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    gather, speed = {}, {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for launcher in ("mpirun", "mlx.launch"):
            _, train = fine_tune(Path(tmp) / launcher, a.iters, [], launcher)
            seconds = sorted(r["gather_seconds"] for r in train[1:])  # the first: warm-up
            step = statistics.median(r["seconds"] for r in train[1:])
            gather[launcher] = {"reports": len(seconds), "median_s": statistics.median(seconds),
                                "p90_s": seconds[int(0.9 * (len(seconds) - 1))],
                                "max_s": seconds[-1], "median_step_s": step}
            print(launcher, gather[launcher], flush=True)
        for i in range(a.repeats):
            for mode, extra in MODES.items():
                summary, _ = fine_tune(Path(tmp) / f"{i}{extra[0]}", a.iters, extra)
                speed[mode].append(summary["tokens_per_second"])
                print(mode, round(summary["tokens_per_second"]), flush=True)
    print(table(["launcher", "reports", "gather median ms", "p90 ms", "max ms",
                 "median step ms", "gather / step"],
                [[k, v["reports"], 1e3 * v["median_s"], 1e3 * v["p90_s"], 1e3 * v["max_s"],
                  1e3 * v["median_step_s"], v["median_s"] / v["median_step_s"]]
                 for k, v in gather.items()]))
    base = statistics.median(speed["--no-rank-timing"])
    print(table(["timing", "tokens/s (median)", "runs", "vs --no-rank-timing"],
                [[mode, statistics.median(v), " ".join(f"{x:.0f}" for x in v),
                  statistics.median(v) / base] for mode, v in speed.items()]))
    path = save("rank_metrics", {"iters": a.iters, "repeats": a.repeats, "gather": gather,
                                 "tokens_per_second": speed})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
