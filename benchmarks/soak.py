"""Kill-and-resume soak: a 2-rank fine-tune of the tiny model is killed again and again at a
random moment and resumed after each kill; the finished run must equal an uninterrupted one.

The run has 4 steps a cycle (at least 24), a checkpoint every 3 and a validation every 5.
Each cycle picks, with a seeded random generator, a rank and a moment to SIGKILL it (the
fault hooks of :mod:`course_lib.fault_injection`); each
four cycles hold one kill of every kind, in a random order:

- ``step``: as step N starts (its peer is then inside the step's all-reduce);
- ``eval``: as the validation at step N starts;
- ``save``: rank 0 in the middle of writing the checkpoint at step N;
- ``time``: T seconds after training starts, wherever the rank then is.

Then it continues with ``--resume`` (or afresh when no checkpoint was complete yet). When
the run finally completes, its per-step train losses and adapter weights are compared
with an uninterrupted run's. Per cycle the table shows where the kill fell, how long
``mpirun`` took to end the job after the kill (``stop s``), how long the next run took from
its start to its first new step (``recover s``: start-up, model load, checkpoint restore),
and how many finished steps the kill cost (``steps redone``).

    .venv/bin/python benchmarks/soak.py --cycles 20 --seed 0     # ~8 minutes on 2 cores

``tests/test_reliability.py`` runs :func:`soak` with a few cycles. Writes
``results/soak.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from course_lib import checkpoint, metrics  # noqa: E402
from course_lib.launch import child_env, mpirun_command  # noqa: E402

TRAIN_ARGS = ["--steps-per-report", "1", "--steps-per-eval", "5", "--save-every", "3",
              "--val-batches", "1", "--seed", "1"]
ARGS = ["--model", "tiny", "--no-progress", *TRAIN_ARGS]
KINDS = ("step", "eval", "save", "time")


def fine_tune(out: Path, iters: int, *extra) -> list[str]:
    """The 2-rank command of the soak's run of ``iters`` steps into ``out``."""
    return mpirun_command(2, sys.executable, "-m", "course_lib.fine_tune", *ARGS,
                          "--iters", str(iters), "--adapter-path", str(out), *extra)


def _option(name: str) -> int:
    return int(ARGS[ARGS.index(name) + 1])


def pick_fault(rng: random.Random, done: int, kind: str, iters: int) -> tuple[str, str, int]:
    """``(kind, COURSE_LIB_FAULT value, rank)``: a fault of ``kind`` at a random rank and
    moment within the next two checkpoints of a run that resumes after step ``done`` (so
    that kills spread over the run), falling back to ``step`` when no validation or save
    is left there."""
    every_eval, every_save = _option("--steps-per-eval"), _option("--save-every")
    rank = rng.randrange(2)
    ahead = range(done + 1, min(iters, done + 2 * every_save) + 1)
    evals = [n for n in range(0 if done == 0 else done + 1,
                              min(iters, done + 2 * every_eval) + 1)
             if n % every_eval == 0 or n == iters]
    saves = [n for n in ahead if n % every_save == 0]
    if kind == "eval" and evals:
        return kind, f"kill-rank-{rank}@eval-{rng.choice(evals)}", rank
    if kind == "save" and saves:  # only rank 0 writes
        return kind, f"kill-in-save@{rng.choice(saves)}", 0
    if kind == "time":
        return kind, f"kill-rank-{rank}@after-{rng.uniform(0.2, 3.0):.2f}s", rank
    return "step", f"kill-rank-{rank}@{rng.choice(ahead)}", rank


def _run(cmd: list[str], out: Path, env: dict, log: Path, first_new_step: int,
         timeout: float) -> dict:
    """Run ``cmd``; time its exit and its first train record past ``first_new_step - 1``."""
    old = _inode(out / metrics.FILE)  # the run replaces the file when it starts
    tic = time.time()
    recovered = None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while proc.poll() is None:
            if (recovered is None and _inode(out / metrics.FILE) not in (old, None)
                    and _has_step(out, first_new_step)):
                recovered = time.time() - tic
            if time.time() - tic > timeout:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{cmd} ran longer than {timeout} s; see {log}")
            time.sleep(0.05)
    end = time.time()
    text = log.read_text()
    m = re.search(r"fault injected: \S+: SIGKILL rank \d+ at ([0-9.]+)", text)
    return {"returncode": proc.returncode, "seconds": end - tic,
            "recover_s": recovered, "stop_s": end - float(m.group(1)) if m else None,
            "fault_fired": m is not None, "output": text}


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _has_step(out: Path, it: int) -> bool:
    return any(r["split"] == "train" and r["iteration"] == it
               for r in metrics.read(out, missing_ok=True))


def soak(out: Path, reference: Path, cycles: int, iters: int = 24, seed: int = 0,
         timeout: float = 120, echo=None) -> dict:
    """Kill the run of ``iters`` steps in ``out`` ``cycles`` times (fewer if it completes
    first), resuming after each, then let it finish; compare it with the uninterrupted run
    of as many steps in ``reference`` (made with :func:`fine_tune`).

    Returns ``{"cycles": [...], "survived": n, "max_loss_rel_diff": x,
    "max_weight_abs_diff": y}``. Raises RuntimeError when a run hangs (``timeout`` s) or
    fails other than by the injected kill.
    """
    import mlx.core as mx

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    records, kinds = [], []
    for cycle in range(cycles + 1):
        done = checkpoint.latest(out) or 0
        resume = ["--resume"] if done else []
        if not kinds:  # every kind once in each four cycles, in a random order
            kinds = rng.sample(KINDS, len(KINDS))
        last = cycle == cycles
        kind, fault, rank = (("finish", "", None) if last else
                             pick_fault(rng, done, kinds.pop(), iters))
        env = child_env(COURSE_LIB_FAULT=fault)
        r = _run(fine_tune(out, iters, *resume), out, env, out.parent / f"{out.name}-{cycle}.log",
                 done + 1, timeout)
        if r["returncode"] != 0 and not r["fault_fired"]:
            raise RuntimeError(f"cycle {cycle} ({fault or 'no fault'}) exited "
                               f"{r['returncode']} without the injected kill:\n"
                               f"{r['output'][-3000:]}")
        rec = {"cycle": cycle, "kind": kind, "fault": fault or "-", "rank": rank,
               "resumed_from": done, "returncode": r["returncode"],
               "killed": r["fault_fired"], "stop_s": r["stop_s"],
               "recover_s": r["recover_s"] if done else None, "seconds": r["seconds"]}
        if r["fault_fired"]:
            reached = max((x["iteration"] for x in metrics.read(out, missing_ok=True)
                           if x["split"] == "train"), default=0)
            rec["steps_redone"] = max(reached - (checkpoint.latest(out) or 0), 0)
        records.append(rec)
        if echo:
            echo(rec)
        if r["returncode"] == 0:
            break
    else:
        raise RuntimeError("the run did not finish in the last cycle")

    done_losses = {m["iteration"]: m["loss"] for m in metrics.read(out) if m["split"] == "train"}
    ref_losses = {m["iteration"]: m["loss"] for m in metrics.read(reference)
                  if m["split"] == "train"}
    if sorted(done_losses) != sorted(ref_losses):
        raise RuntimeError(f"steps differ: {sorted(done_losses)} vs {sorted(ref_losses)}")
    a = mx.load(str(out / "adapters.safetensors"))
    b = mx.load(str(reference / "adapters.safetensors"))
    return {"cycles": records, "survived": sum(r["killed"] for r in records),
            "max_loss_rel_diff": max(abs(done_losses[i] - ref_losses[i]) / abs(ref_losses[i])
                                     for i in ref_losses),
            "max_weight_abs_diff": max(mx.abs(a[k] - b[k]).max().item() for k in b),
            "same_weight_names": sorted(a) == sorted(b)}


def main(argv=None) -> int:
    import tempfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import save, table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, help="steps of the run (default: 4 a cycle, at "
                   "least 24)")
    args = p.parse_args(argv)
    iters = args.iters or max(24, 4 * args.cycles)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        tic = time.time()
        subprocess.run(fine_tune(tmp / "reference", iters), check=True, capture_output=True,
                       env=child_env(), cwd=REPO)
        print(f"uninterrupted run of {iters} steps: {time.time() - tic:.1f} s")
        result = soak(tmp / "run", tmp / "reference", args.cycles, iters, args.seed,
                      echo=lambda r: print(f"cycle {r['cycle']}: {r['fault']} -> exit "
                                           f"{r['returncode']}", flush=True))
    rows = [[r["cycle"], r["kind"], r["fault"], r["resumed_from"], r["returncode"],
             "-" if r["stop_s"] is None else r["stop_s"],
             "-" if r["recover_s"] is None else r["recover_s"], r.get("steps_redone", "-")]
            for r in result["cycles"]]
    print(table(["cycle", "kind", "fault", "resumed from", "exit", "stop s", "recover s",
                 "steps redone"], rows))
    stops = [r["stop_s"] for r in result["cycles"] if r["stop_s"] is not None]
    recovers = [r["recover_s"] for r in result["cycles"] if r["recover_s"] is not None]
    print(f"\ncycles survived: {result['survived']} kills ({args.cycles} asked), each "
          "followed by a resume; "
          f"stop after a kill: median {statistics.median(stops):.2f} s, max {max(stops):.2f} s; "
          f"recover (start to first new step): median {statistics.median(recovers):.2f} s, "
          f"max {max(recovers):.2f} s")
    print(f"finished run vs uninterrupted: losses within {result['max_loss_rel_diff']:.2g} "
          f"(relative), weights within {result['max_weight_abs_diff']:.2g}")
    path = save("soak", {"cycles_asked": args.cycles, "seed": args.seed, "iters": iters,
                         "args": ARGS,
                         **result})
    print(f"wrote {path}")
    ok = result["max_loss_rel_diff"] <= 1e-5 and result["max_weight_abs_diff"] <= 1e-5
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
