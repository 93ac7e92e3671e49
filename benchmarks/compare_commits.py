"""What one change buys: the real-model fine-tune of ``real_model.py`` (SmolLM2 float32, the
default recipe, 1 rank) from an earlier commit and from this checkout, alternating, on the
same machine in the same minutes, so that a change is measured apart from how fast the
machine runs that day.

The earlier commit is checked out into a temporary ``git worktree`` (removed at the end);
both sides run ``python -m course_lib.fine_tune`` from this ``.venv`` with ``PYTHONPATH`` set
to their tree. Throughput counts scored tokens of steps 2.. (step 1 pays one-time costs),
as ``real_model.py`` does; the losses of the first steps show that both trained alike.

    python benchmarks/compare_commits.py BEFORE [--iters 12] [--repeats 2] [-- OPTIONS...]

``BEFORE`` is any git revision; OPTIONS go to both fine-tunes. Prints a table and writes
results/compare_commits.json.
"""

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from common import PY, REPO, env_for, median, save, table

from course_lib import metrics


def fine_tune(tree: Path, iters: int, out: Path, extra: list) -> dict:
    """One run from source tree ``tree``: scored tokens/s of steps 2.., the first losses,
    the peak memory."""
    env = env_for(1)
    env["PYTHONPATH"] = str(tree)
    # From inside the tree: ``python -m`` puts the working folder first on sys.path.
    where = subprocess.run([PY, "-c", "import course_lib; print(course_lib.__file__)"],
                           env=env, cwd=tree, capture_output=True, text=True, check=True)
    if not Path(where.stdout.strip()).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: course_lib imports from {where.stdout.strip()} instead")
    cmd = [PY, "-m", "course_lib.fine_tune", "--no-progress", "--model", "smollm2:float32",
           "--iters", iters, "--steps-per-report", 1, "--steps-per-eval", 10**6,
           "--val-batches", 1, "--save-every", 10**6, "--adapter-path", out, *extra]
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=tree, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fine-tune from {tree} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    steps = [m for m in metrics.read(out) if m["split"] == "train"]
    seconds = sum(m["seconds"] for m in steps[1:])
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_second": sum(m["tokens"] for m in steps[1:]) / seconds,
            "losses": [m["loss"] for m in steps], "peak_memory_gb": summary["peak_memory_gb"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", help="the earlier git revision")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("options", nargs="*", help="fine-tune options for both (after --)")
    a = p.parse_args()
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", a.before],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        raise SystemExit(f"before: no git revision {a.before!r} in {REPO}")
    here = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True).stdout
    names = {"before": f"{rev.stdout.strip()} ({a.before})",
             "after": f"{here}{' + uncommitted changes' if dirty.strip() else ''} (this checkout)"}
    results = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree),
                        a.before], check=True)
        try:
            trees = {"before": tree, "after": REPO}
            for rep in range(a.repeats):
                for side in (["before", "after"] if rep % 2 == 0 else ["after", "before"]):
                    r = fine_tune(trees[side], a.iters, Path(tmp) / f"{side}-{rep}", a.options)
                    results[side].append(r)
                    print(f"{side} (repeat {rep}): {r['tokens_per_second']:.1f} scored tokens/s, "
                          f"peak {r['peak_memory_gb']:.2f} GB, first losses "
                          f"{[round(x, 4) for x in r['losses'][:4]]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           check=False)
    tps = {s: median([r["tokens_per_second"] for r in runs]) for s, runs in results.items()}
    mem = {s: median([r["peak_memory_gb"] for r in runs]) for s, runs in results.items()}
    worst = max(abs(x - y) / abs(x) for rb in results["before"] for ra in results["after"]
                for x, y in zip(rb["losses"], ra["losses"]))
    print(table(["tree", "scored tokens/s", "x before", "peak GB"],
                [[names[s], tps[s], tps[s] / tps["before"], mem[s]] for s in results]))
    print(f"largest relative difference of a step's loss, before against after: {worst:.1e}")
    print("saved", save("compare_commits", {
        "before": names["before"], "after": names["after"], "iters": a.iters,
        "repeats": a.repeats, "options": a.options, "tokens_per_second": tps,
        "speedup": tps["after"] / tps["before"], "peak_memory_gb": mem,
        "loss_max_relative_difference": worst, "runs": results}))


if __name__ == "__main__":
    main()
