"""Chapter 5 reads the runs it takes apart from chapter 4's ``runs/ch4``, or from the folder
``COURSE_CH5_RUNS`` names (a workshop room's runs, ``docs/WORKSHOP.md``):
:func:`course_lib.scaling.scaling_runs`, and the chapter's set-up cell that calls it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from conftest import REPO
from course_lib import scaling
from course_lib.scaling import SCALING_RUNS_ENV, scaling_runs

CHAPTER_5 = REPO / "notebooks" / "05_conclusions.ipynb"
PHASES = {"data": 0.001, "forward_backward": 2.0, "wait": 0.05, "all_reduce": 0.01,
          "optimizer": 0.02}


def write_run(folder: Path, world_size: int, hosts: list[str], global_batch: int = 8,
              step_timing: bool = True) -> None:
    """A finished run's ``summary.json`` and ``metrics.jsonl`` (one report, one ``rank``
    record per rank), as ``course_lib.fine_tune`` writes them."""
    folder.mkdir(parents=True)
    summary = {"backend": "none" if world_size == 1 else "mpi", "world_size": world_size,
               "iterations": 24, "global_batch": global_batch, "trainable_parameters": 16}
    if step_timing:
        summary["step_seconds"] = PHASES
    (folder / "summary.json").write_text(json.dumps(summary))
    records = [{"iteration": 4, "split": "train", "loss": 3.0, "world_size": world_size}]
    records += [{"iteration": 4, "split": "rank", "loss": 3.0, "world_size": world_size,
                 "rank": r, "host": hosts[r % len(hosts)], "tokens": 100, "step_seconds": 2.0}
                for r in range(world_size)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def room(tmp_path, monkeypatch):
    """A room's runs: 1 rank on the instructor's laptop, 3 ranks on 2 laptops."""
    monkeypatch.delenv(SCALING_RUNS_ENV, raising=False)
    write_run(tmp_path / "room" / "solo", 1, ["teacher"])
    write_run(tmp_path / "room" / "duo", 3, ["teacher", "student-1"])
    return tmp_path / "room"


def test_reads_the_one_rank_and_n_rank_runs_with_their_hosts(room):
    folder, solo, multi = scaling_runs(room)
    assert folder == room
    assert (solo["world_size"], multi["world_size"]) == (1, 3)
    assert solo["hosts"] == ["teacher"] and multi["hosts"] == ["teacher", "student-1"]
    assert multi["step_seconds"] == PHASES


def test_the_environment_variable_names_the_folder(room, monkeypatch):
    monkeypatch.setenv(SCALING_RUNS_ENV, str(room))
    assert scaling_runs()[0] == room
    # A relative path is taken from the course checkout, not the working directory.
    monkeypatch.setattr(scaling, "REPO", room.parent)
    monkeypatch.setenv(SCALING_RUNS_ENV, "room")
    assert scaling_runs()[0] == room


def test_without_the_variable_it_reads_chapter_4s_folder(room, monkeypatch):
    monkeypatch.setattr(scaling, "REPO", room.parent)
    (room.parent / "runs").mkdir()
    room.rename(room.parent / "runs" / "ch4")
    assert scaling_runs()[0] == room.parent / "runs" / "ch4"


def test_a_missing_run_is_named_with_its_folder(room, monkeypatch):
    (room / "solo" / "summary.json").unlink()  # an unfinished run has no summary yet
    with pytest.raises(FileNotFoundError, match="write both runs there") as e:
        scaling_runs(room)
    assert f"{room} has no finished run in solo/" in str(e.value)
    monkeypatch.setenv(SCALING_RUNS_ENV, str(room / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere has no finished run in solo/"):
        scaling_runs()
    # Chapter 4's folder, by default: the message says to run chapter 4 (path from the checkout).
    monkeypatch.delenv(SCALING_RUNS_ENV)
    monkeypatch.setattr(scaling, "REPO", room.parent)
    with pytest.raises(FileNotFoundError, match=r"^runs/ch4 has no finished run in solo/.*"
                       "run chapter 4 first, or set COURSE_CH5_RUNS"):
        scaling_runs()


@pytest.mark.parametrize("broken, message", [
    (lambda room: write_run(room / "duo", 2, ["a"], step_timing=False), "--step-timing"),
    (lambda room: write_run(room / "duo", 1, ["a"]), "solo/ must hold a 1-rank run"),
    (lambda room: write_run(room / "duo", 2, ["a"], global_batch=16), "global batches differ"),
])
def test_runs_it_cannot_compare_are_refused(room, broken, message):
    for f in (room / "duo").iterdir():
        f.unlink()
    (room / "duo").rmdir()
    broken(room)
    with pytest.raises(ValueError, match=message):
        scaling_runs(room)


def test_chapter_5_set_up_cell_reads_the_rooms_runs(room, monkeypatch):
    """The chapter's first code cell, read from the notebook, on the room's folder."""
    import mlx.core as mx

    mx.save_safetensors(str(room / "duo" / "adapters.safetensors"),
                        {"a": mx.zeros((2, 4)), "b": mx.zeros((4, 2))})
    monkeypatch.setenv(SCALING_RUNS_ENV, str(room))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(REPO / "notebooks")  # the cells' relative paths, as in Jupyter
    cells = json.loads(CHAPTER_5.read_text(encoding="utf-8"))["cells"]
    setup = next("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    printed = io.StringIO()
    namespace: dict = {"__name__": "chapter_5"}
    with contextlib.redirect_stdout(printed):
        exec(compile(setup, "<chapter 5: set-up cell>", "exec"), namespace)
    assert namespace["N"] == 3 and namespace["RUNS"] == room
    assert f"runs: {room.name}: 1 rank and 3 ranks on 2 hosts" in printed.getvalue()
    assert namespace["calls_plain"] == 3  # two LoRA arrays and the token count
