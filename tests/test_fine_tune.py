"""The fine-tune: 1 rank == 2 ranks, end to end outputs, and bad input."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import PY, fine_tune_cmd, mlx_launch, mpirun, read_train_losses, run

SHORT = ["--iters", "6", "--steps-per-report", "1", "--steps-per-eval", "100",
         "--val-batches", "2", "--batch-size", "8", "--seed", "3"]


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) >= 5
    return max(abs(a[k] - b[k]) / abs(a[k]) for k in a)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("solo")
    run(fine_tune_cmd(*SHORT, "--adapter-path", out))
    return out


@pytest.mark.slow
def test_a_run_that_builds_the_model_follows_a_run_that_finds_it(tmp_path):
    """Building a course model draws from MLX's random generator (SmolLM2's conversion loads
    it once to check it); the LoRA matrices are drawn after it, from the run's seed, so the
    first run on a machine (an empty model cache) gives the curve of every later one."""
    from course_lib.launch import child_env

    env = child_env()
    env["COURSE_LIB_CACHE"] = str(tmp_path / "cache")
    short = ["--model", "smollm2:float32", "--iters", "3", "--batch-size", "2", "--max-seq-length",
             "256", "--steps-per-report", "1", "--steps-per-eval", "100", "--val-batches", "1"]
    first = run(fine_tune_cmd(*short, "--adapter-path", tmp_path / "first"), env=env)
    assert "Converting SmolLM2" in first.stderr  # this run built the model
    later = run(fine_tune_cmd(*short, "--adapter-path", tmp_path / "later"), env=env)
    assert "Converting SmolLM2" not in later.stderr
    built, found = read_train_losses(tmp_path / "first"), read_train_losses(tmp_path / "later")
    assert list(built) == [1, 2, 3] and built == found  # the same process, the same numbers


@pytest.mark.distributed
def test_two_mpi_ranks_follow_the_one_rank_loss_curve(one_rank_run, tmp_path):
    run(mpirun(2, *fine_tune_cmd(*SHORT, "--adapter-path", tmp_path)))
    solo, duo = read_train_losses(one_rank_run), read_train_losses(tmp_path)
    assert list(solo) == [1, 2, 3, 4, 5, 6]
    assert _max_rel_diff(solo, duo) < 1e-4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["backend"], summary["world_size"], summary["per_rank_batch"]) == ("mpi", 2, 4)


@pytest.mark.distributed
def test_two_ring_ranks_via_mlx_launch_follow_it_too(one_rank_run, tmp_path):
    run(mlx_launch(2, *fine_tune_cmd(*SHORT, "--adapter-path", tmp_path)))
    assert _max_rel_diff(read_train_losses(one_rank_run), read_train_losses(tmp_path)) < 1e-4
    assert json.loads((tmp_path / "summary.json").read_text())["backend"] == "ring"


@pytest.mark.distributed
def test_compiled_step_with_phase_timing_follows_it_too(one_rank_run, tmp_path):
    """mx.compile'd forward+backward and update (--compile), timed phase by phase with the
    barrier that separates waiting from the all-reduce: still the 1-rank (op by op) curve."""
    run(mpirun(2, *fine_tune_cmd(*SHORT, "--compile", "--step-timing",
                                 "--adapter-path", tmp_path)))
    assert _max_rel_diff(read_train_losses(one_rank_run), read_train_losses(tmp_path)) < 1e-4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compiled"] is True
    from course_lib.fine_tune import compile_by_default  # on a GPU only

    assert json.loads((one_rank_run / "summary.json").read_text())["compiled"] is \
        compile_by_default()
    phases = summary["step_seconds"]
    assert list(phases) == ["data", "forward_backward", "wait", "all_reduce", "optimizer"]
    assert all(v >= 0 for v in phases.values()) and phases["forward_backward"] > 0


def test_scored_logits_give_mlx_lms_loss_and_gradients(tiny_model, sample_data):
    """--loss scored (logits only where a token is scored) computes default_loss's value
    and gradients, on prompt-masked rows of different lengths."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss

    from course_lib.fine_tune import add_adapters, load_data, parse
    from course_lib.fine_tune.batches import pad_batch
    from course_lib.fine_tune.loss import scored_loss

    plan = parse(["--model", "tiny", "--mask-prompt"])
    model, tokenizer = load(str(tiny_model))
    train, _ = load_data(sample_data, tokenizer, plan)
    add_adapters(model, plan)
    for multiple in (1, 32):  # the padding of plain and of compiled steps
        batch = pad_batch(train[:6], 512, multiple)  # file order: lengths differ
        lengths = batch[1].tolist()
        assert len({n for _, n in lengths}) > 1 and all(offset > 0 for offset, _ in lengths)
        (ref, n_ref), g_ref = nn.value_and_grad(model, default_loss)(model, *batch)
        (ours, n), g = nn.value_and_grad(model, scored_loss)(model, *batch)
        assert n.item() == n_ref.item() > 0
        assert abs(ours.item() - ref.item()) < 1e-6 * ref.item()
        worst = max(mx.abs(a - b).max().item() / (mx.abs(a).max().item() + 1e-12)
                    for (_, a), (_, b) in zip(tree_flatten(g_ref), tree_flatten(g)))
        assert worst < 1e-4


def test_cross_entropy_gives_mlxs_value_and_gradient():
    """The scored loss's cross-entropy on a CPU (one exponential per logit, through
    mx.power) against mlx.nn.losses.cross_entropy: ordinary and very large logits, half
    precision. (Rows that score nothing: test_a_report_whose_rows_score_no_token...)"""
    import mlx.core as mx
    import mlx.nn as nn

    from course_lib.fine_tune.loss import cross_entropy

    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # the form under test (a GPU uses mlx's own)
    try:
        mx.random.seed(0)
        targets = mx.random.randint(0, 1000, (7,))
        for scale, dtype in ((3.0, mx.float32), (1e4, mx.float32), (3.0, mx.bfloat16)):
            logits = (mx.random.normal((7, 1000)) * scale).astype(dtype)
            wide = logits.astype(mx.float32)  # mlx's loss reduces in the logits' dtype on a CPU
            ref, g_ref = mx.value_and_grad(lambda x: nn.losses.cross_entropy(x, targets).sum())(wide)
            ours, g = mx.value_and_grad(lambda x: cross_entropy(x, targets).sum())(logits)
            assert ours.dtype == mx.float32 and mx.isfinite(ours).item()
            assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
            worst = (mx.abs(g.astype(mx.float32) - g_ref).max() / mx.abs(g_ref).max()).item()
            assert worst < (1e-2 if dtype == mx.bfloat16 else 1e-5)  # bfloat16: its gradient's rounding
    finally:
        mx.set_default_device(device)


def test_loss_all_follows_the_scored_curve(one_rank_run, tmp_path):
    run(fine_tune_cmd(*SHORT, "--loss", "all", "--adapter-path", tmp_path))
    assert _max_rel_diff(read_train_losses(one_rank_run), read_train_losses(tmp_path)) < 1e-4
    assert json.loads((tmp_path / "summary.json").read_text())["loss"] == "all"
    assert json.loads((one_rank_run / "summary.json").read_text())["loss"] == "scored"


def test_two_streams_give_the_one_stream_curve_and_weights(one_rank_run, tmp_path):
    """--streams 2 computes each batch as two pieces on concurrent MLX streams and adds
    their token-summed gradients: the loss curve and the adapter of one stream."""
    import mlx.core as mx

    run(fine_tune_cmd(*SHORT, "--streams", "1", "--adapter-path", tmp_path / "one"))
    proc = run(fine_tune_cmd(*SHORT, "--streams", "2", "--adapter-path", tmp_path / "two"))
    assert _max_rel_diff(read_train_losses(tmp_path / "one"),
                         read_train_losses(tmp_path / "two")) < 1e-5
    one, two = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("one", "two"))
    assert one.keys() == two.keys() and len(one) > 0
    # Float rounding only (Adam's division by the root of the second moment magnifies it
    # where a gradient is near zero): measured 5.6e-5 of an array's norm at most.
    relative = max((mx.linalg.norm(one[k] - two[k]) / mx.linalg.norm(one[k])).item()
                   for k in one)
    assert relative < 1e-3
    assert not all(mx.array_equal(one[k], two[k]).item() for k in one)  # really 2 pieces
    for name, streams in (("one", 1), ("two", 2)):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["streams_per_rank"] == streams
    assert "as 2 pieces on concurrent MLX streams" in proc.stdout


@pytest.mark.distributed
def test_mean_of_rank_means_drifts_token_weighting_does_not(one_rank_run, tmp_path):
    """The design's token-weighting lesson: mlx_lm's plain mean of per-rank means is not the
    full-batch gradient when ranks hold different token counts; ours is."""
    run(mpirun(2, *fine_tune_cmd(*SHORT, "--loss-weighting", "ranks",
                                 "--adapter-path", tmp_path / "ranks")))
    run(mpirun(2, *fine_tune_cmd(*SHORT, "--adapter-path", tmp_path / "tokens")))
    solo = read_train_losses(one_rank_run)
    drift_ranks = _max_rel_diff(solo, read_train_losses(tmp_path / "ranks"))
    drift_tokens = _max_rel_diff(solo, read_train_losses(tmp_path / "tokens"))
    assert drift_tokens < 1e-5 < drift_ranks
    assert drift_ranks > 5 * drift_tokens


@pytest.mark.distributed
@pytest.mark.slow
def test_real_model_at_two_ranks_end_to_end(tmp_path, smollm2):
    """The course's default: SmolLM2 and its recipe, a few steps under mpirun -np 2; then
    mlx_lm's own generate command loads the converted model with our adapter."""
    out = tmp_path / "adapters"
    proc = run(mpirun(2, *fine_tune_cmd("--model", "smollm2:float32", "--iters", "4",
                                        "--steps-per-report", "2", "--steps-per-eval", "4",
                                        "--val-batches", "1", "--save-every", "2",
                                        "--adapter-path", out)))
    assert "Done in" in proc.stdout and "Recipe smollm2" in proc.stdout
    names = {p.name for p in out.iterdir()}
    expected = {"adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png",
                "summary.json", "0000002_adapters.safetensors", "0000004_adapters.safetensors"}
    assert expected <= names, names
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 4
    assert summary["final_valid_loss"] < summary["initial_valid_loss"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "valid", "rank"}
    assert all(r["world_size"] == 2 for r in records)
    ranks = [r for r in records if r["split"] == "rank"]  # one per rank and report
    assert [r["rank"] for r in ranks] == [0, 1] * 2 and all(r["step_seconds"] > 0 for r in ranks)
    train = [r for r in records if r["split"] == "train"]
    assert all(r["tokens_per_second"] > 0 and r["peak_memory_gb"] > 0 for r in train)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["model"] == str(smollm2) and config["model_name"] == "smollm2:float32"
    assert config["num_layers"] == 8 and config["mask_prompt"] is True

    gen = run([PY, "-m", "mlx_lm", "generate", "--model", config["model"],
               "--adapter-path", out, "--prompt", "What is a black hole?", "--max-tokens", "12"])
    text = gen.stdout.split("==========")[1].strip()
    assert len(text.split()) >= 5, gen.stdout


# ----------------------------------------------------------------------------- bad input

def _snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def earlier_outputs(tmp_path, one_rank_run):
    """An adapter folder holding a finished run's outputs, to prove they survive."""
    out = tmp_path / "earlier"
    shutil.copytree(one_rank_run, out)
    return out


def _bad_data(tmp_path, sample_data, line: str) -> Path:
    folder = tmp_path / "bad-data"
    folder.mkdir()
    rows = (sample_data / "train.jsonl").read_text().splitlines()
    rows.insert(4, line)  # becomes line 5
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copy(sample_data / "valid.jsonl", folder / "valid.jsonl")
    return folder


BAD_CASES = {
    "batch-not-divisible": (2, ["--batch-size", "3"], "not divisible by the world size 2"),
    "batch-smaller-than-world": (2, ["--batch-size", "1"], "smaller than the world size 2"),
    "missing-data-folder": (1, ["--data", "no/such/folder"], "--data no/such/folder: no such folder"),
    "zero-iters": (1, ["--iters", "0"], "--iters must be at least 1"),
    "negative-iters": (1, ["--iters", "-5"], "--iters must be at least 1, got -5"),
    "unknown-fine-tune-type": (1, ["--fine-tune-type", "qlora"],
                               "argument --fine-tune-type: invalid choice: 'qlora'"),
    "too-many-layers": (1, ["--num-layers", "99"], "the model has 4 layers"),
    "zero-streams": (1, ["--streams", "0"],
                     "argument --streams: must be auto or a whole number >= 1, got '0'"),
    "streams-with-sharding": (2, ["--streams", "2", "--sharding", "fsdp"],
                              "--streams 2 needs --sharding none"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_options_fail_clearly_and_keep_earlier_outputs(case, earlier_outputs):
    ranks, extra, message = BAD_CASES[case]
    before = _snapshot(earlier_outputs)
    cmd = fine_tune_cmd(*extra, "--adapter-path", earlier_outputs)
    proc = run(mpirun(2, *cmd) if ranks == 2 else cmd, check=False, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(earlier_outputs) == before


@pytest.mark.distributed
def test_ranks_that_read_different_data_stop_together(tmp_path, sample_data, earlier_outputs):
    """mpirun's colon form starts rank 0 and rank 1 with different --data: every rank stops
    with one clear line (no rank left waiting in a collective), and nothing is written."""
    other = tmp_path / "other-data"
    other.mkdir()
    rows = (sample_data / "train.jsonl").read_text().splitlines()
    (other / "train.jsonl").write_text("\n".join(rows[:-8]) + "\n")
    shutil.copy(sample_data / "valid.jsonl", other / "valid.jsonl")
    before = _snapshot(earlier_outputs)
    first = mpirun(1, *fine_tune_cmd("--adapter-path", earlier_outputs))
    second = fine_tune_cmd("--data", other, "--adapter-path", earlier_outputs)
    proc = run([*first, ":", "-np", "1", *second], check=False, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("the ranks do not agree on their inputs: training data, "
                             "training rows differ") == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(earlier_outputs) == before


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "train.jsonl:5: not valid JSON"),
    ('{"messages": []}', "train.jsonl:5: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]}',
     "train.jsonl:5: messages[0]: field 'content' must be a string"),
    ("", "train.jsonl:5: blank line"),
])
def test_bad_rows_in_training_data_name_file_and_line(line, message, tmp_path, sample_data,
                                                      earlier_outputs):
    data = _bad_data(tmp_path, sample_data, line)
    before = _snapshot(earlier_outputs)
    proc = run(fine_tune_cmd("--data", data, "--adapter-path", earlier_outputs), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(earlier_outputs) == before


def test_a_max_seq_length_that_cuts_every_response_off_is_a_clear_error(earlier_outputs):
    before = _snapshot(earlier_outputs)
    proc = run(fine_tune_cmd("--iters", "2", "--mask-prompt", "--max-seq-length", "8",
                             "--adapter-path", earlier_outputs), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.jsonl: no row scores a token" in proc.stderr
    assert "--max-seq-length 8" in proc.stderr and "--no-mask-prompt" in proc.stderr
    assert _snapshot(earlier_outputs) == before


@pytest.mark.parametrize("loss", ["scored", "all"])
def test_a_report_whose_rows_score_no_token_has_no_loss(loss, tmp_path, tiny_model,
                                                        sample_data):
    """Rows whose prompt fills --max-seq-length score nothing: warned about at the start;
    a report window of only such rows has no mean loss (null in metrics.jsonl), its steps
    change no weight into NaN (mlx_lm's loss divides by the zero count), and the run goes
    on to train on the rows that do score."""
    import mlx.core as mx

    data = tmp_path / "data"
    data.mkdir()
    chat = lambda prompt: json.dumps({"messages": [  # noqa: E731
        {"role": "user", "content": prompt}, {"role": "assistant", "content": "Arr, aye."}]})
    (data / "train.jsonl").write_text("\n".join([chat("word " * 200)] * 5 + [chat("Hi?")] * 3))
    shutil.copy(sample_data / "valid.jsonl", data / "valid.jsonl")
    proc = run(fine_tune_cmd("--data", data, "--iters", "8", "--batch-size", "1",
                             "--loss", loss, "--mask-prompt", "--max-seq-length", "96",
                             "--steps-per-report", "1", "--steps-per-eval", "100",
                             "--val-batches", "1", "--adapter-path", tmp_path / "run"))
    assert "warning: 5 rows of train.jsonl score no token" in proc.stderr
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    windows = [r for r in map(json.loads, lines) if r["split"] == "train"]  # strict JSON
    assert "NaN" not in "".join(lines)
    assert len(windows) == 8 and {r["tokens"] == 0 for r in windows} == {True, False}
    assert all((r["loss"] is None) == (r["tokens"] == 0) for r in windows)
    scored = [r["loss"] for r in windows if r["loss"] is not None]
    assert scored[-1] < scored[0]  # it learned from the rows that score
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_train_loss"] == scored[-1]
    adapters = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    assert adapters and all(mx.isfinite(a).all().item() for a in adapters.values())


def test_lora_alpha_sets_scale_and_is_written_for_mlx_lm(tmp_path, tiny_model):
    run(fine_tune_cmd("--iters", "2", "--steps-per-eval", "100", "--val-batches", "1",
                      "--lora-rank", "4", "--lora-alpha", "16", "--adapter-path", tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_parameters"] == {"rank": 4, "scale": 4.0, "dropout": 0.0, "alpha": 16.0}
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 4


def test_warmup_raises_the_learning_rate_linearly_then_holds(tmp_path):
    run(fine_tune_cmd("--iters", "6", "--warmup-steps", "4", "--learning-rate", "4e-4",
                      "--steps-per-report", "1", "--steps-per-eval", "100", "--val-batches", "1",
                      "--adapter-path", tmp_path))
    from course_lib import metrics

    rates = [r["learning_rate"] for r in metrics.read(tmp_path) if r["split"] == "train"]
    assert rates == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 4e-4], rel=1e-5)
    bad = run(fine_tune_cmd("--warmup-steps", "-1", "--adapter-path", tmp_path / "bad"),
              check=False)
    assert bad.returncode == 2 and "--warmup-steps must be 0 or more" in bad.stderr


# ----------------------------------------------------------------------------- streams

def test_stream_pieces_interleave_rows_and_trim_their_padding():
    import mlx.core as mx
    import numpy as np

    from course_lib.fine_tune.batches import pad_batch
    from course_lib.fine_tune.speed import StreamSplit

    rows = [(list(range(1, n + 1)), 2) for n in (3, 5, 9, 17)]  # sorted, as in a batch
    tokens, lengths = pad_batch(rows, 512, 1)
    assert tokens.shape == (4, 18)
    pieces = StreamSplit(2).pieces(tokens, lengths)
    # Rows 0, 2 and 1, 3 (as ranks take theirs), each piece one past its longest row.
    assert [p[0].shape for p in pieces] == [(2, 10), (2, 18)]
    assert np.array(pieces[0][1]).tolist() == [[2, 3], [2, 9]]
    assert np.array(pieces[1][0])[0, :6].tolist() == [1, 2, 3, 4, 5, 0]
    split = StreamSplit(2)
    sums = split.map(lambda t, l: t.sum(), tokens, lengths)
    assert sum(s.item() for s in sums) == tokens.sum().item()
    assert StreamSplit(1).pieces(tokens, lengths)[0][0] is tokens
    assert len(StreamSplit(8).pieces(tokens, lengths)) == 4  # never an empty piece
    assert len(StreamSplit(2, multiple=32).pieces(tokens, lengths)[0][0][0]) == 18  # <= width
    mx.eval(sums)


def test_streams_default_to_the_cores_per_rank_on_a_cpu(monkeypatch):
    import os

    from course_lib import blas
    from course_lib.fine_tune.plan import streams_per_rank

    import mlx.core as mx

    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)  # a CPU, also on a Mac
    cores = os.cpu_count() or 1
    monkeypatch.setattr(blas, "blas_threads", lambda: None)  # no OpenBLAS: cores per rank
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    assert streams_per_rank("auto", rows=64) == min(cores, 64)
    assert streams_per_rank("auto", rows=1) == 1           # never more than the rows
    assert streams_per_rank(3, rows=2) == 2
    assert streams_per_rank("auto", rows=64, sharded=True) == 1
    assert streams_per_rank("auto", rows=64, compiled=True) == 1
    assert streams_per_rank("auto", rows=64, full=True) == 1
    assert streams_per_rank(2, rows=64, full=True) == 2       # asked for: given
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", str(cores))  # a rank per core
    assert streams_per_rank("auto", rows=64) == 1
    # With OpenBLAS, the threads this rank was given (the lab's one-core hosts get 1).
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE")
    monkeypatch.setattr(blas, "blas_threads", lambda: 1)
    assert streams_per_rank("auto", rows=64) == 1
    monkeypatch.setattr(blas, "blas_threads", lambda: 3)
    assert streams_per_rank("auto", rows=64) == 3
