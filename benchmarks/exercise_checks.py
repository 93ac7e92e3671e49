"""How long one ``check()`` of each exercise takes: the learner's wait after running the cell.

Each exercise's check runs the course's own solution (so every rank runs to the end, and the
typical wrong answers are computed too) ``--repeats`` times; the table gives the median and
the slowest. A 1-rank check is one fresh Python process; a 2-rank one starts ``mpirun -np 2``
(``course_lib/exercises/core.py``).

    python benchmarks/exercise_checks.py [--repeats 3]

Prints a table and writes results/exercise_checks.json.
"""

import argparse
import importlib

from common import median, save, table

CHAPTERS = ["ch1", "ch2", "ch3", "ch4", "ch5", "ch6"]


def exercises():
    """Every exercise, in chapter order."""
    from course_lib.exercises import Exercise

    for chapter in CHAPTERS:
        module = importlib.import_module(f"course_lib.exercises.{chapter}")
        for value in vars(module).values():
            if isinstance(value, Exercise) and value.name.startswith(chapter + "."):
                yield value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = []
    for ex in exercises():
        seconds = []
        for _ in range(args.repeats):
            verdict = ex.verdict(ex.reference)
            if not verdict.passed:
                raise SystemExit(f"{ex.name}: the solution did not pass: {verdict}")
            seconds.append(verdict.seconds)
        rows.append({"exercise": ex.name, "ranks": ex.ranks, "mistakes": len(ex.mistakes),
                     "median_s": median(seconds), "max_s": max(seconds)})
        print(f"{ex.name}: {median(seconds):.2f} s", flush=True)
    print(table(["exercise", "ranks", "mistakes recognised", "median s", "slowest s"],
                [[r["exercise"], r["ranks"], r["mistakes"], f"{r['median_s']:.2f}",
                  f"{r['max_s']:.2f}"] for r in rows]))
    save("exercise_checks", {"repeats": args.repeats, "count": len(rows),
                             "distributed": sum(r["ranks"] > 1 for r in rows),
                             "exercises": rows})


if __name__ == "__main__":
    main()
