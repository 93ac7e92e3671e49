"""Checkpoints, resume, and ranks that die or hang (issue: reliability)."""

import json
import time

import mlx.core as mx
import pytest
from conftest import fine_tune_cmd, mpirun, read_train_losses, run

from course_lib import checkpoint, launch

# A warm-up that ends after the first checkpoint, so resuming continues it exactly too.
ARGS = ["--iters", "12", "--steps-per-report", "1", "--steps-per-eval", "100",
        "--save-every", "4", "--val-batches", "1", "--seed", "1", "--warmup-steps", "6"]


def _adapters(folder):
    return mx.load(str(folder / "adapters.safetensors"))


def _max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(mpirun(2, *fine_tune_cmd(*ARGS, "--adapter-path", out)))
    return out


def _timed(cmd, env):
    tic = time.monotonic()
    proc = run(cmd, check=False, env=launch.child_env(**env), timeout=120)
    return proc, time.monotonic() - tic


@pytest.mark.distributed
def test_killed_rank_then_killed_save_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    out = tmp_path / "run"
    # 1. Rank 1 is SIGKILLed when step 7 starts: the survivor must not hang.
    proc, seconds = _timed(mpirun(2, *fine_tune_cmd(*ARGS, "--adapter-path", out)),
                           {"COURSE_LIB_FAULT": "kill-rank-1@7"})
    assert proc.returncode != 0 and seconds < 60
    assert "rank 1" in proc.stdout + proc.stderr  # mpirun names the dead rank
    assert checkpoint.latest(out) == 4

    # 2. Resume; rank 0 is SIGKILLed in the middle of writing the checkpoint at step 8.
    proc, seconds = _timed(mpirun(2, *fine_tune_cmd(*ARGS, "--resume", "--adapter-path", out)),
                           {"COURSE_LIB_FAULT": "kill-in-save@8"})
    assert proc.returncode != 0 and seconds < 60
    assert (out / "0000008_adapters.safetensors").exists()  # half a checkpoint...
    assert not (out / "0000008_state.json").exists()
    assert checkpoint.latest(out) == 4  # ...which does not count: 4 is intact

    # 3. Resume again and finish: the same losses and weights as never interrupted.
    proc = run(mpirun(2, *fine_tune_cmd(*ARGS, "--resume", "--adapter-path", out)))
    assert "Resuming from the checkpoint at iteration 4" in proc.stdout
    done, ref = read_train_losses(out), read_train_losses(uninterrupted)
    assert sorted(done) == list(range(1, 13))
    assert max(abs(done[i] - ref[i]) / ref[i] for i in ref) < 1e-5
    assert _max_weight_diff(_adapters(out), _adapters(uninterrupted)) < 1e-5
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 4


@pytest.mark.distributed
def test_ring_rank_death_is_reported_by_run_fine_tune(tmp_path, tiny_model):
    """mlx.launch itself exits 0 when a rank dies; run_fine_tune closes that gap."""
    tic = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 exited with code -9"):
        launch.run_fine_tune(tmp_path, ranks=2, launcher="mlx.launch", progress=False,
                             args=ARGS, timeout=90, env_extra={"COURSE_LIB_FAULT": "kill-rank-1@3"})
    assert time.monotonic() - tic < 60


@pytest.mark.distributed
def test_a_stopped_rank_ends_the_run_within_the_step_timeout(tmp_path, tiny_model):
    proc, seconds = _timed(mpirun(2, *fine_tune_cmd(*ARGS, "--step-timeout", "5",
                                                    "--adapter-path", tmp_path)),
                           {"COURSE_LIB_FAULT": "stop-rank-1@3"})
    assert proc.returncode != 0 and seconds < 60
    assert "no step finished for 5 s" in proc.stderr


def test_resume_from_one_rank_checkpoint_matches(tmp_path, tiny_model):
    full, part = tmp_path / "full", tmp_path / "part"
    run(fine_tune_cmd(*ARGS, "--iters", "8", "--adapter-path", full))
    run(fine_tune_cmd(*ARGS, "--iters", "4", "--adapter-path", part))
    run(fine_tune_cmd(*ARGS, "--iters", "8", "--resume-adapter-file",
                      part / "0000004_adapters.safetensors", "--adapter-path", part))
    assert read_train_losses(part) == read_train_losses(full)  # bit for bit on one rank
    assert _max_weight_diff(_adapters(part), _adapters(full)) == 0.0


@pytest.mark.distributed
def test_world_size_may_change_where_it_does_not_matter(tmp_path, uninterrupted):
    """Token-weighted averaging makes N ranks compute the 1-rank update, so a 2-rank
    checkpoint continues on 1 rank; with --loss-weighting ranks it may not."""
    part = tmp_path / "part"
    run(mpirun(2, *fine_tune_cmd(*ARGS, "--iters", "4", "--adapter-path", part)))
    run(fine_tune_cmd(*ARGS, "--resume", "--adapter-path", part))
    done, ref = read_train_losses(part), read_train_losses(uninterrupted)
    assert max(abs(done[i] - ref[i]) / ref[i] for i in ref) < 1e-4

    ranks = tmp_path / "ranks"
    run(mpirun(2, *fine_tune_cmd(*ARGS, "--iters", "4", "--loss-weighting", "ranks",
                                 "--adapter-path", ranks)))
    proc = run(fine_tune_cmd(*ARGS, "--loss-weighting", "ranks", "--resume",
                             "--adapter-path", ranks), check=False)
    assert proc.returncode == 2 and "world_size: 2 -> 1" in proc.stderr


@pytest.mark.parametrize("change,message", [
    (["--lora-rank", "4"], "lora_parameters"),
    (["--batch-size", "4"], "batch_size: 8 -> 4"),
    (["--iters", "4"], "--iters 4: the checkpoint is already at iteration 4"),
])
def test_resume_refuses_settings_that_cannot_continue(tmp_path, tiny_model, change, message):
    run(fine_tune_cmd(*ARGS, "--iters", "4", "--adapter-path", tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = run(fine_tune_cmd(*ARGS, *change, "--resume", "--adapter-path", tmp_path), check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_without_checkpoint_and_bad_adapter_files(tmp_path, tiny_model):
    proc = run(fine_tune_cmd(*ARGS, "--resume", "--adapter-path", tmp_path / "new"), check=False)
    assert proc.returncode == 2 and "--resume: no complete checkpoint" in proc.stderr
    assert not (tmp_path / "new").exists()
    wrong = tmp_path / "wrong.safetensors"
    mx.save_safetensors(str(wrong), {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((3, 3))})
    proc = run(fine_tune_cmd(*ARGS, "--resume-adapter-file", wrong, "--adapter-path",
                             tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "does not fit this model" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no config", "bad weights"])
def test_bad_model_folders_are_named(tmp_path, tiny_model, case):
    model = tmp_path / "model"
    model.mkdir()
    if case == "bad weights":
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (model / name).write_bytes((tiny_model / name).read_bytes())
        mx.save_safetensors(str(model / "model.safetensors"), {"nonsense": mx.zeros((2,))})
    proc = run(fine_tune_cmd(*ARGS, "--model", model, "--adapter-path", tmp_path / "out"),
               check=False)
    assert proc.returncode == 2 and f"--model {model}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
