"""The live dashboard: per-rank records, TensorBoard event files (read back with
TensorBoard's own reader), the monitor's server, and the page in a real browser."""

import json
import math
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import PY, REPO, fine_tune_cmd, mpirun, run

from course_lib.fine_tune.callbacks import run_name

ARGS = ["--iters", "6", "--steps-per-report", "1", "--steps-per-eval", "3", "--val-batches",
        "2", "--batch-size", "8", "--seed", "3", "--report-to", "tensorboard"]
RANK_FIELDS = {"iteration", "split", "world_size", "rank", "host", "loss", "tokens",
               "step_seconds", "forward_backward_seconds", "all_reduce_wait_seconds",
               "peak_memory_gb"}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("dashboard") / "run"
    run(mpirun(2, *fine_tune_cmd(*ARGS, "--adapter-path", out)))
    return out


def records(folder: Path, split: str) -> list[dict]:
    from course_lib import metrics

    return [r for r in metrics.read(folder) if r["split"] == split]


def scalars(folder: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run -> tag -> [(step, value)], read with TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for run_dir in sorted(p for p in (folder / "tensorboard").iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run_dir))
        acc.Reload()
        found[run_dir.name] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                               for tag in acc.Tags()["scalars"]}
    return found


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * abs(b)  # event files hold float32


def same_series(series: list[tuple[int, float]], expected: dict[int, float]) -> bool:
    return [s for s, _ in series] == list(expected) and all(
        close(v, expected[s]) for s, v in series)


@pytest.mark.distributed
def test_every_rank_reports_its_own_numbers(two_rank_run):
    """One record per rank and report, gathered on rank 0; together they make the
    global numbers (tokens add up, token-weighted losses give the global loss)."""
    train, ranks = records(two_rank_run, "train"), records(two_rank_run, "rank")
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [(r["iteration"], r["rank"]) for r in ranks] == [
        (it, rank) for it in range(1, 7) for rank in (0, 1)]
    host = socket.gethostname()
    for rec in ranks:
        assert set(rec) == RANK_FIELDS and rec["host"] == host
        assert rec["step_seconds"] > rec["forward_backward_seconds"] > 0
        assert 0 <= rec["all_reduce_wait_seconds"] < rec["step_seconds"]
        assert rec["peak_memory_gb"] > 0 and rec["world_size"] == 2
    for t in train:
        mine = [r for r in ranks if r["iteration"] == t["iteration"]]
        assert sum(r["tokens"] for r in mine) == t["tokens"]
        weighted = sum(r["loss"] * r["tokens"] for r in mine) / t["tokens"]
        assert close(weighted, t["loss"], 1e-5)
        assert t["peak_memory_gb"] == pytest.approx(max(r["peak_memory_gb"] for r in mine))
        assert 0 < t["gather_seconds"] < t["seconds"]
    # The two ranks hold different rows: their own losses differ.
    assert any(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(ranks[::2], ranks[1::2]))


@pytest.mark.distributed
def test_per_rank_times_plot_one_line_per_rank(two_rank_run, tmp_path):
    from course_lib import metrics
    from course_lib.plotting import plot_rank_times

    fig = plot_rank_times(metrics.read(two_rank_run), tmp_path / "ranks.png")
    ranks = records(two_rank_run, "rank")
    for ax, field in zip(fig.axes, ["forward_backward_seconds", "all_reduce_wait_seconds",
                                    "step_seconds"]):
        assert [list(line.get_ydata()) for line in ax.get_lines()] == [
            [r[field] for r in ranks if r["rank"] == rank] for rank in (0, 1)]
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no per-rank phase times"):
        plot_rank_times(records(two_rank_run, "train"))


@pytest.mark.distributed
def test_event_files_hold_metrics_jsonl_per_rank(two_rank_run):
    """TensorBoard's reader finds the run's series: global train and validation loss equal
    to metrics.jsonl's, and every rank's loss, step time and wait equal to its records."""
    found = scalars(two_rank_run)
    ranks = records(two_rank_run, "rank")
    names = {r["rank"]: run_name(r["rank"], r["host"]) for r in ranks}
    assert set(found) == {"global", names[0], names[1]}
    glob = found["global"]
    assert same_series(glob["train_loss"],
                       {r["iteration"]: r["loss"] for r in records(two_rank_run, "train")})
    assert same_series(glob["val_loss"],
                       {r["iteration"]: r["loss"] for r in records(two_rank_run, "valid")})
    assert [s for s, _ in glob["val_loss"]] == [0, 3, 6]
    assert {"learning_rate", "tokens_per_second", "trained_tokens", "peak_memory",
            "iterations_per_second", "gather_seconds"} <= set(glob)
    for rank, name in names.items():
        mine = [r for r in ranks if r["rank"] == rank]
        for tag, field in [("train_loss", "loss"), ("step_seconds", "step_seconds"),
                           ("forward_backward_seconds", "forward_backward_seconds"),
                           ("all_reduce_wait_seconds", "all_reduce_wait_seconds"),
                           ("tokens", "tokens"), ("peak_memory", "peak_memory_gb")]:
            assert same_series(found[name][tag], {r["iteration"]: r[field] for r in mine}), tag


def test_resumed_run_continues_the_series_once(tmp_path, tiny_model):
    """A run of 5 steps with a checkpoint at step 3, then resumed to step 8: it reruns
    steps 4 and 5, and TensorBoard's reader shows every step once (the new points replace
    the first run's), equal to metrics.jsonl."""
    out = tmp_path / "run"
    args = ["--steps-per-report", "1", "--steps-per-eval", "100", "--val-batches", "1",
            "--save-every", "3", "--report-to", "tensorboard", "--adapter-path", out]
    run(fine_tune_cmd("--iters", "5", *args))
    first = {r["iteration"]: r["loss"] for r in records(out, "train")}
    assert same_series(scalars(out)["global"]["train_loss"], first)
    run(fine_tune_cmd("--iters", "8", "--resume", *args))
    losses = {r["iteration"]: r["loss"] for r in records(out, "train")}
    assert list(losses) == list(range(1, 9))
    found = scalars(out)
    assert same_series(found["global"]["train_loss"], losses)
    (rank0,) = [n for n in found if n != "global"]
    assert [s for s, _ in found[rank0]["train_loss"]] == list(range(1, 9))
    assert len(list((out / "tensorboard" / "global").glob("events.out.tfevents.*"))) == 2


def start_monitor(folder: Path) -> tuple[subprocess.Popen, str]:
    """``python -m course_lib.monitor FOLDER --port 0`` and its URL (the browser check's)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from check_dashboard import start_monitor as start

    return start(folder)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def served_loss(url: str, run_name_: str, tag: str = "train_loss") -> dict[int, float]:
    query = urllib.parse.urlencode({"run": run_name_, "tag": tag})
    return {step: value for _, step, value in
            get_json(f"{url}data/plugin/scalars/scalars?{query}")}


@pytest.mark.distributed
def test_monitor_serves_every_ranks_series_on_localhost(two_rank_run):
    proc, url = start_monitor(two_rank_run)
    try:
        assert url.startswith("http://localhost:")
        ranks = records(two_rank_run, "rank")
        names = sorted({run_name(r["rank"], r["host"]) for r in ranks})
        assert get_json(f"{url}data/runs") == ["global", *names]
        for rank, name in enumerate(names):
            expected = {r["iteration"]: r["loss"] for r in ranks if r["rank"] == rank}
            got = served_loss(url, name)
            assert list(got) == list(expected)
            assert all(close(got[i], expected[i]) for i in expected)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_monitor_shows_a_run_while_it_trains(tmp_path, tiny_model):
    """Started on a folder no run has made yet, the monitor serves the loss of a run that
    starts later, while it is still training."""
    out = tmp_path / "later"
    proc, url = start_monitor(out)
    train = subprocess.Popen([str(c) for c in fine_tune_cmd(
        "--iters", "400", "--steps-per-report", "5", "--steps-per-eval", "1000",
        "--val-batches", "1", "--save-every", "1000", "--report-to", "tensorboard",
        "--adapter-path", out)], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        seen, deadline = {}, time.monotonic() + 120
        while train.poll() is None and time.monotonic() < deadline and len(seen) < 2:
            time.sleep(0.5)
            tags = get_json(f"{url}data/plugin/scalars/tags")
            if "train_loss" in tags.get("global", {}):
                seen = served_loss(url, "global")
        assert train.poll() is None, "the run ended before the dashboard showed it"
        assert len(seen) >= 2 and all(s % 5 == 0 for s in seen)
        assert all(math.isfinite(v) for v in seen.values())
    finally:
        train.kill()
        train.wait()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.distributed
def test_headless_chromium_shows_every_ranks_loss(two_rank_run):
    """The browser check (scripts/check_dashboard.py): Chromium renders the dashboard and
    its train_loss chart lists each rank's series at the last step with its loss."""
    sys.path.insert(0, str(REPO / "scripts"))
    from check_dashboard import NO_BROWSER, find_browser

    if find_browser() is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    proc = run([PY, REPO / "scripts" / "check_dashboard.py", two_rank_run], check=False,
               timeout=300)
    assert proc.returncode != NO_BROWSER
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = records(two_rank_run, "rank")
    last = max(r["iteration"] for r in ranks)
    for r in ranks:
        if r["iteration"] == last:
            assert f"{run_name(r['rank'], r['host'])} (step {last}: {r['loss']:.4f})" \
                in proc.stdout


def test_bad_report_to_fails_clearly(tiny_model, tmp_path):
    proc = run(fine_tune_cmd("--report-to", "tensorboard,nosuch", "--adapter-path", tmp_path),
               check=False, timeout=120)
    assert proc.returncode == 2
    assert "error: --report-to: 'nosuch' is not one of tensorboard, wandb, swanlab" \
        in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_writer_package_names_the_option(monkeypatch):
    import importlib.util

    from course_lib.fine_tune import UsageError
    from course_lib.fine_tune.callbacks import check_report_to

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    with pytest.raises(UsageError, match=r"^--report-to tensorboard: tensorboardX is not "
                       r"installed: bash scripts/setup.sh installs it"):
        check_report_to("TensorBoard")
    check_report_to("TensorBoard", need_packages=False)  # ranks other than 0 write nothing
