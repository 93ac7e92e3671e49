"""The loop's bookkeeping, in this process: a :class:`Plan` literal, the tiny model, one rank
(MLX's world of one), ``train`` called directly, as ``mlx_lm``'s trainer is tested with its
``TrainingArgs``. What starts ranks is tested in test_fine_tune.py and test_resume.py."""

import json
import threading
import time

import pytest

PLAN = dict(model="tiny", batch_size=8, iters=7, steps_per_report=3, steps_per_eval=4,
            save_every=5, val_batches=2, learning_rate=5e-4, seed=3, streams=1,
            rank_timing=True)


@pytest.fixture(scope="module")
def rows(tiny_model, sample_data):
    from course_lib.fine_tune import Plan, load_data, load_model

    _, tokenizer, _ = load_model(str(tiny_model))
    return load_data(sample_data, tokenizer, Plan(**PLAN))


def _train(tiny_model, rows, folder, start=None, resume_from=None, **changes):
    """``train`` on a fresh tiny model with adapters, as ``cli.run`` calls it; with
    ``resume_from``, the model and optimizer first restored from that checkpoint in
    ``folder``."""
    import mlx.core as mx

    from course_lib import checkpoint
    from course_lib.fine_tune import Outputs, Plan, add_adapters, load_model, make_optimizer
    from course_lib.fine_tune.loop import Start, train
    from course_lib.fine_tune.sharding import Sharding

    plan = Plan(**{**PLAN, "adapter_path": str(folder), **changes})
    model, _, _ = load_model(str(tiny_model), seed=plan.seed)
    add_adapters(model, plan)
    optimizer = make_optimizer(plan, model)
    sharding = Sharding("none", mx.distributed.init())
    start = start or Start(settings={"seed": plan.seed})
    if resume_from is not None:
        checkpoint.restore(folder, resume_from, model, optimizer, sharding.group, sharding)
    outputs = Outputs(folder, enabled=True)
    try:
        start.history = outputs.start({"model": plan.model}, resume_from=resume_from)
        history, stats = train(model, optimizer, rows, plan, sharding, outputs, start)
    finally:
        outputs.close()
    return history, stats


def test_reports_validations_and_checkpoints_fall_on_their_steps(tiny_model, rows, tmp_path):
    history, stats = _train(tiny_model, rows, tmp_path)
    at = lambda split: [h["iteration"] for h in history if h["split"] == split]  # noqa: E731
    assert at("train") == [3, 6, 7]            # every 3 steps, and the last
    assert at("valid") == [0, 4, 7]            # before the first step, every 4, the last
    assert at("rank") == [3, 6, 7]             # one per rank (one here) and report
    train = [h for h in history if h["split"] == "train"]
    assert stats["train_tokens"] == sum(h["tokens"] for h in train) > 0
    assert abs(stats["train_seconds"] - sum(h["seconds"] for h in train)) < 1e-9
    assert stats["loss"] == "scored" and stats["streams"] == 1
    ranks = [h for h in history if h["split"] == "rank"]
    assert [r["tokens"] for r in ranks] == [h["tokens"] for h in train]
    assert all(r["forward_backward_seconds"] > 0 for r in ranks)  # --rank-timing
    # A checkpoint every 5 steps: its state records the settings and the data order.
    state = json.loads((tmp_path / "0000005_state.json").read_text())
    assert state["iteration"] == 5 and state["settings"] == {"seed": 3}
    assert not (tmp_path / "0000006_state.json").exists()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == json.loads(json.dumps(history))  # what is kept is what is written
    # The watchdog (--step-timeout) stops with the loop: this process goes on.
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "watchdog" and t.is_alive()]


def test_a_run_continued_from_its_checkpoint_is_the_unbroken_run(tiny_model, rows, tmp_path):
    """Steps 6 and 7 after restoring step 5's checkpoint, its data order and its records:
    the unbroken run's losses, exactly (one process, the same kernels)."""
    import mlx.core as mx

    from course_lib import checkpoint
    from course_lib.fine_tune.loop import Start

    whole, _ = _train(tiny_model, rows, tmp_path / "whole", steps_per_report=1)
    folder = tmp_path / "parts"
    _train(tiny_model, rows, folder, iters=5, steps_per_report=1)
    state = checkpoint.read_state(folder, 5, mx.distributed.init())
    start = Start(iteration=5, data_order=state["data_order"], settings={"seed": 3})
    continued, stats = _train(tiny_model, rows, folder, start=start, resume_from=5,
                              steps_per_report=1)
    after = lambda h: [(r["iteration"], r["split"], r["loss"]) for r in h  # noqa: E731
                       if r["split"] in ("train", "valid") and r["iteration"] > 5]
    assert [(it, split) for it, split, _ in after(whole)] == [(6, "train"), (7, "train"),
                                                               (7, "valid")]
    assert after(continued) == after(whole)
    assert [r["iteration"] for r in continued if r["split"] == "train"] == list(range(1, 8))
    assert stats["train_tokens"] == sum(r["tokens"] for r in continued
                                        if r["split"] == "train" and r["iteration"] > 5)


def test_phase_totals_come_with_step_timing(tiny_model, rows, tmp_path):
    history, stats = _train(tiny_model, rows, tmp_path, iters=3, step_timing=True)
    phases = stats["step_seconds"]
    assert list(phases) == ["data", "forward_backward", "wait", "all_reduce", "optimizer"]
    assert phases["forward_backward"] > 0 and phases["wait"] == 0  # one rank: no barrier
    train = [h for h in history if h["split"] == "train"]
    assert set(train[0]["phase_seconds"]) == set(phases)
