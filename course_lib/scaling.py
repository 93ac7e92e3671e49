"""Chapter 5's evidence: a finished 1-rank fine-tune and an N-rank one of the same options,
read back (chapter 4's runs, or a workshop room's: ``docs/WORKSHOP.md``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from course_lib import metrics
from course_lib.fine_tune.outputs import SUMMARY_FILE

REPO = Path(__file__).resolve().parent.parent
SCALING_RUNS_ENV = "COURSE_CH5_RUNS"  # chapter 5 reads the runs in this folder when it is set


def scaling_runs(folder: str | Path | None = None,
                 default: str | Path = "runs/ch4") -> tuple[Path, dict, dict]:
    """The two finished fine-tunes chapter 5 compares: ``(folder, solo, multi)``, the
    ``summary.json`` of ``folder/solo`` (1 rank) and of ``folder/duo`` (N > 1 ranks), the
    layout chapter 4 writes. A workshop writes the room's run there with ``--adapter-path``
    (``docs/WORKSHOP.md``). ``folder`` defaults to ``$COURSE_CH5_RUNS``, else ``default``; a
    relative path is taken from the course's checkout. Each summary gets ``hosts``: the
    distinct hosts its ranks ran on, in rank order, from the run's ``"rank"`` records of
    ``metrics.jsonl`` (``[]`` when it has none).

    Raises ``FileNotFoundError`` naming the folder when a run is missing or unfinished (no
    ``summary.json``), and ``ValueError`` when a run has the wrong world size, ran without
    ``--step-timing`` (no ``step_seconds``), or the two global batches differ."""
    chosen = folder or os.environ.get(SCALING_RUNS_ENV)
    folder = Path(chosen or default)
    folder = folder if folder.is_absolute() else REPO / folder
    shown = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    runs = {}
    for name, ranks in (("solo", "1 rank"), ("duo", "N > 1 ranks")):
        summary = folder / name / SUMMARY_FILE
        if not summary.is_file():
            raise FileNotFoundError(
                f"{shown} has no finished run in {name}/ ({name}/summary.json, {ranks}): "
                + ("write both runs there, each as a fine-tune's --adapter-path "
                   "(docs/WORKSHOP.md)" if chosen else
                   f"run chapter 4 first, or set {SCALING_RUNS_ENV} to a folder that holds "
                   "solo/ (1 rank) and duo/ (N ranks)"))
        run = json.loads(summary.read_text())
        if "step_seconds" not in run:
            raise ValueError(f"{shown}/{name} ran without --step-timing: run it again with "
                             "--step-timing (chapter 5 reads each phase of a step)")
        records = metrics.read(folder / name, missing_ok=True)
        run["hosts"] = list(dict.fromkeys(r["host"] for r in records
                                          if r.get("split") == "rank" and "host" in r))
        runs[name] = run
    solo, multi = runs["solo"], runs["duo"]
    if solo["world_size"] != 1 or multi["world_size"] < 2:
        raise ValueError(f"{shown}: solo/ must hold a 1-rank run and duo/ one of 2 or more "
                         f"ranks; they have {solo['world_size']} and {multi['world_size']}")
    if solo["global_batch"] != multi["global_batch"]:
        raise ValueError(f"{shown}: the runs' global batches differ ({solo['global_batch']} "
                         f"and {multi['global_batch']}): compare runs of the same options")
    return folder, solo, multi
