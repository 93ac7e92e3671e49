"""How long a workshop takes, step by step: the set-up a student does before the day, and
``python -m course_lib.workshop`` from ``hosts`` to a finished 2-host run in the lab.

Needs root and Linux (``course_lib.lab``). It brings up its own lab (``course-lab-ws``),
gives host b an empty folder of its own at this checkout's path (``Lab.own_folder``: the
lab's hosts share the file system otherwise), runs the workshop's steps on host a as an
instructor would, brings the lab down, prints a table and writes
``benchmarks/results/workshop_lab.json``.

1. ``--setup``: what each student runs before the day, measured here: ``bash
   scripts/setup.sh`` into a new virtual environment with an empty pip cache (every package
   fetched from pip's configured indexes again; system packages skipped), then ``python -m
   course_lib.models smollm2`` into an empty model cache (the model's conversion);
2. the day: ``hosts``, ``keys``, ``sync`` (the first one: host b's folder is empty, so the
   whole checkout goes over; ``--copy-venv``, since the lab's hosts have no internet),
   ``check``, ``run`` (``--model``, default ``tiny``, ``--iters``): wall seconds of each.

Results: ``results/workshop_lab.json`` for the tiny model, ``workshop_lab_MODEL.json`` else.

    sudo .venv/bin/python benchmarks/workshop_lab.py [--setup] [--model smollm2] [--iters 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, save, table  # benchmarks/common.py

from course_lib.lab import ADDRESSES, Lab, unavailable_reason


def _timed(cmd, env=None, cwd=REPO, timeout=3600) -> tuple[float, str]:
    tic = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)
    seconds = time.perf_counter() - tic
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def before_the_day() -> list[dict]:
    """setup.sh into a fresh venv with an empty pip cache, then the model's conversion."""
    with tempfile.TemporaryDirectory(prefix="course-setup-") as tmp:
        venv, pip_cache, models = Path(tmp) / "venv", Path(tmp) / "pip", Path(tmp) / "models"
        env = {**os.environ, "COURSE_VENV": str(venv), "PIP_CACHE_DIR": str(pip_cache),
               "COURSE_SKIP_SYSTEM": "1", "COURSE_LIB_CACHE": str(models)}
        env.pop("LD_PRELOAD", None)
        setup, _ = _timed(["bash", "scripts/setup.sh"], env=env)
        venv_bytes = _size(venv)
        model, _ = _timed([venv / "bin" / "python", "-m", "course_lib.models", "smollm2"],
                          env=env)
        return [{"step": "bash scripts/setup.sh (new venv, empty pip cache)",
                 "seconds": setup, "note": f"venv {venv_bytes / 1e6:.0f} MB; packages from "
                 "pip's configured indexes (`pip config list`)"},
                {"step": "python -m course_lib.models smollm2 (first use)",
                 "seconds": model, "note": f"{_size(models) / 1e6:.0f} MB in the model cache"}]


def the_day(model: str, iters: int) -> list[dict]:
    lab = Lab("course-lab-ws")
    lab.up(log=lambda m: None)
    out = REPO / "runs" / "workshop_lab_benchmark"
    try:
        lab.own_folder("b", REPO)
        hostfile = out / "hostfile"
        ws = [sys.executable, "-m", "course_lib.workshop", "--hostfile", hostfile]
        a, b = ADDRESSES["a"], ADDRESSES["b"]
        steps = [("hosts", ["hosts", a, b]), ("keys", ["keys"]),
                 ("sync --copy-venv (first)", ["sync", "--copy-venv", "--model", model]),
                 ("check", ["check"]),
                 (f"run ({model}, {iters} steps, 2 hosts)",
                  ["run", "--", "--model", model, "--iters", str(iters), "--no-progress",
                   "--adapter-path", out / "adapters"])]
        rows = []
        for name, args in steps:
            seconds, stdout = _timed(lab.host_command("a", *ws, *args, cwd=REPO), env=lab.env())
            rows.append({"step": name, "seconds": seconds, "note": ""})
            if name.startswith("sync"):
                rows[-1]["note"] = next(ln for ln in stdout.splitlines()
                                        if ln.startswith(f"ok    {b}")).split(": ", 1)[1]
        summary = json.loads((out / "adapters" / "summary.json").read_text())
        rows[-1]["note"] = (f"world size {summary['world_size']}, "
                            f"{summary['tokens_per_second']:.0f} tokens/s, final train loss "
                            f"{summary['final_train_loss']:.3f}")
        return rows
    finally:
        lab.down(log=lambda m: None)
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true",
                        help="also time a student's set-up (downloads from the registry)")
    parser.add_argument("--model", default="tiny", help="model of the run (default tiny)")
    parser.add_argument("--iters", type=int, default=6, help="steps of the run (default 6)")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    before = before_the_day() if args.setup else []
    day = the_day(args.model, args.iters)
    total = sum(r["seconds"] for r in day)
    rows = [*before, *day, {"step": "hosts -> finished 2-host run", "seconds": total,
                            "note": "the day's steps together"}]
    print(table(["step", "seconds", "note"],
                [[r["step"], round(r["seconds"], 1), r["note"]] for r in rows]))
    path = save("workshop_lab" + ("" if args.model == "tiny" else f"_{args.model}"), {"model": args.model, "iters": args.iters,
                                 "before_the_day": before, "the_day": day,
                                 "hosts_to_finished_run_seconds": total})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
