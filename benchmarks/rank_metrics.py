"""What the per-rank dashboard costs: the all_gather per report, and the step timing.

Two measurements at 2 ranks on the tiny model:

1. The gather. Every train record of metrics.jsonl holds ``gather_seconds``: rank 0's time
   for the one ``all_gather`` of every rank's numbers at that report. It comes right after
   the report's all_sum, so the ranks arrive together and it is the call's own cost.
   Median, 90th percentile and maximum over a run that reports every step, under mpirun
   (MPI) and mlx.launch (ring), next to the median step.
2. The timing. One process pair builds the training step three times over the same model:
   with no timing (``--no-rank-timing``: one evaluation per step), with the default
   per-rank timing (``--rank-timing``: an evaluation after forward+backward and after the
   all-reduce, no barrier) and with ``--step-timing`` (every phase evaluated, plus a
   barrier). It runs them in turn on the same batch, round after round (a different batch
   each round), so that the load of a shared machine falls on all three alike; median
   seconds per step of each, on rank 0.

    python benchmarks/rank_metrics.py [--iters 60] [--rounds 40]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import PY, launch, run, save, table

from course_lib import metrics

MODES = {"--no-rank-timing": (False, False), "--rank-timing (default)": (True, False),
         "--step-timing": (True, True)}


def gather_cost(folder: Path, iters: int, launcher: str) -> dict:
    run(launch(2, [PY, "-m", "course_lib.fine_tune", "--no-progress", "--model", "tiny",
                   "--iters", iters, "--steps-per-report", 1, "--steps-per-eval", 10**6,
                   "--val-batches", 1, "--save-every", 10**6, "--adapter-path", folder],
               launcher=launcher))
    train = [r for r in metrics.read(folder) if r["split"] == "train"][1:]  # the first report: warm-up
    seconds = sorted(r["gather_seconds"] for r in train)
    return {"reports": len(seconds), "median_s": statistics.median(seconds),
            "p90_s": seconds[int(0.9 * (len(seconds) - 1))], "max_s": seconds[-1],
            "median_step_s": statistics.median(r["seconds"] for r in train)}


def worker(rounds: int, per_mode: int) -> None:
    """Under mpirun/mlx.launch -n 2: the three timings in turn; prints a JSON line on rank 0."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from course_lib import distributed as dist
    from course_lib.fine_tune import (DEFAULT_DATA, PhaseTimer, add_adapters, load_data,
                                      load_model, make_step, parse)
    from course_lib.fine_tune.batches import GlobalBatches
    from course_lib.fine_tune.loss import loss_function
    from course_lib.fine_tune.sharding import Sharding

    group, backend = dist.init_world()
    rank, size = group.rank(), group.size()
    plan = parse(["--model", "tiny"], size, backend, rank)
    model, tokenizer, _ = load_model(plan.model)
    train_rows, _ = load_data(DEFAULT_DATA, tokenizer, plan)
    add_adapters(model, plan)
    optimizer = optim.Adam(learning_rate=plan.learning_rate)
    optimizer.init(model.trainable_parameters())
    timers = {m: PhaseTimer(enabled, barrier=barrier) for m, (enabled, barrier) in MODES.items()}
    _, loss_fn = loss_function(plan.loss, model)
    sharding = Sharding("none", group)
    steps = {m: make_step(model, optimizer, plan, sharding, loss_fn, t)
             for m, t in timers.items()}
    batches = GlobalBatches(train_rows, plan.batch_size, plan.seed)
    state = [model.state, optimizer.state]
    times = {m: [] for m in MODES}
    for r in range(rounds + 1):  # round 0: warm-up
        micro = [batches.next(rank, size, plan.max_seq_length, plan.pad_multiple)]
        order = list(MODES)[r % 3:] + list(MODES)[:r % 3]
        for mode in order:
            for _ in range(per_mode):
                dist.barrier(group)  # every mode starts its step with the ranks together
                tic = time.perf_counter()
                timers[mode].start()
                timers[mode].lap("data", *micro[0])
                loss, ntoks = steps[mode](micro)
                mx.eval(state, loss, ntoks)
                if r:
                    times[mode].append(time.perf_counter() - tic)
    if rank == 0:
        print(json.dumps({"backend": backend, "steps": {m: v for m, v in times.items()}}),
              flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=60, help="steps of each gather run")
    p.add_argument("--rounds", type=int, default=40, help="batches of the timing comparison")
    p.add_argument("--per-mode", type=int, default=2, help="steps of each timing per batch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.rounds, a.per_mode)
    gather, timing = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for launcher in ("mpirun", "mlx.launch"):
            gather[launcher] = gather_cost(Path(tmp) / launcher, a.iters, launcher)
            print(launcher, gather[launcher], flush=True)
    for launcher in ("mpirun", "mlx.launch"):
        _, out = run(launch(2, [PY, Path(__file__).resolve(), "--worker", "--rounds", a.rounds,
                                "--per-mode", a.per_mode], launcher=launcher))
        line = [x for x in out.splitlines() if x.startswith("{")][-1]
        timing[launcher] = json.loads(line)["steps"]
        print(launcher, {m: statistics.median(v) for m, v in timing[launcher].items()},
              flush=True)
    print(table(["launcher", "reports", "gather median ms", "p90 ms", "max ms",
                 "median step ms", "gather / step"],
                [[k, v["reports"], 1e3 * v["median_s"], 1e3 * v["p90_s"], 1e3 * v["max_s"],
                  1e3 * v["median_step_s"], v["median_s"] / v["median_step_s"]]
                 for k, v in gather.items()]))
    rows = []
    for launcher, modes in timing.items():
        base = statistics.median(modes["--no-rank-timing"])
        for mode, values in modes.items():
            med = statistics.median(values)
            rows.append([launcher, mode, len(values), 1e3 * med, med / base])
    print(table(["launcher", "timing", "steps", "median step ms", "vs --no-rank-timing"], rows))
    path = save("rank_metrics", {"iters": a.iters, "rounds": a.rounds, "per_mode": a.per_mode,
                                 "gather": gather, "step_seconds": timing})
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
