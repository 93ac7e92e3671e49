"""Launch helpers, the distributed CLI, and the style score."""

import json

import pytest
from conftest import PY, json_objects, mpirun, run

from course_lib import evaluate, launch


@pytest.mark.distributed
def test_hello_all_sum_on_two_ranks():
    proc = run(mpirun(2, PY, "-m", "course_lib.distributed", "hello"), timeout=120)
    rows = sorted(json_objects(proc.stdout), key=lambda r: r["rank"])
    assert [(r["rank"], r["sent"], r["received"]) for r in rows] == [(0, 1.0, 3.0), (1, 2.0, 3.0)]


@pytest.mark.distributed
def test_rank_lines_never_run_together():
    """print_line writes each rank's line in one piece: with print(), OpenMPI merged two
    ranks' lines in a few runs per hundred."""
    for _ in range(10):
        out = run(mpirun(2, PY, "-m", "course_lib.distributed", "hello"), timeout=120).stdout
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 2 and all(json.loads(line)["size"] == 2 for line in lines), out


def test_mlx_launch_command_keeps_program_options_for_the_program():
    cmd = launch.mlx_launch_command(2, "python", "-m", "course_lib.fine_tune", "--backend", "ring")
    assert cmd[1:4] == ["-n", "2", "--"] and cmd[-2:] == ["--backend", "ring"]


@pytest.mark.distributed
def test_children_start_clean_after_an_in_process_world(tmp_path):
    """After mx.distributed.init() in this process (an MPI singleton), mpirun started with
    child_env() still works."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys\n"
        "import mlx.core as mx\n"
        "from course_lib.launch import child_env, mpirun_command\n"
        "mx.distributed.init()\n"
        "cmd = mpirun_command(2, sys.executable, '-m', 'course_lib.distributed', 'hello')\n"
        "p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)\n"
        "print(p.returncode, p.stdout.count('received'))\n")
    proc = run([PY, script], timeout=120)
    assert proc.stdout.split()[-2:] == ["0", "2"]


@pytest.mark.distributed
def test_bandwidth_table_on_two_ranks():
    proc = run(mpirun(2, PY, "-m", "course_lib.distributed", "bandwidth", "--sizes",
                      "4KiB,1MiB", "--repeats", "3"), timeout=120)
    rows = json_objects(proc.stdout)
    assert [r["bytes"] for r in rows] == [4096, 1048576]  # rank 0 only prints
    assert all(r["seconds"] > 0 and r["bus_gbps"] > 0 for r in rows)
    bad = run(mpirun(2, PY, "-m", "course_lib.distributed", "bandwidth", "--sizes", "4kb"),
              check=False, timeout=120)
    assert bad.returncode != 0 and "is not like 4KiB" in bad.stderr


def test_run_fine_tune_returns_summary_and_raises_on_failure(tmp_path, tiny_model):
    summary = launch.run_fine_tune(tmp_path / "ok", ranks=1, progress=False,
                                   args=["--iters", "3", "--steps-per-eval", "100",
                                         "--val-batches", "1", "--step-timing"])
    assert summary["iterations"] == 3 and summary["world_size"] == 1
    assert set(summary["step_seconds"]) == {"data", "forward_backward", "wait", "all_reduce",
                                           "optimizer"}
    with pytest.raises(RuntimeError, match="--iters must be at least 1"):
        launch.run_fine_tune(tmp_path / "bad", progress=False, args=["--iters", "0"])


def test_pirate_word_share():
    assert evaluate.pirate_word_share("The capital of France is Paris.") == 0.0
    assert evaluate.pirate_word_share("") == 0.0
    # arr, ye, matey, sailin' are pirate; be, the, sea are plain English too.
    assert evaluate.pirate_word_share("Arr, ye be sailin' the sea, matey!") == pytest.approx(4 / 7)


def test_held_out_prompts_ask_nothing_the_data_asks():
    """The before/after questions are new to the fine-tune: no row of data-sets/ holds
    them, or even their topics."""
    from conftest import REPO

    text = " ".join(p.read_text(encoding="utf-8").lower()
                    for p in (REPO / "data-sets").rglob("*.jsonl"))
    for prompt in evaluate.HELD_OUT_PROMPTS:
        assert prompt.lower() not in text
    for topic in ("black hole", "interest rates", "passport", "paper airplane"):
        assert topic not in text, topic
