"""--sharding fsdp / tensor at 2 real ranks: what each rank holds, the step's gradient, the
loss curve and the saved weights against 1 rank, resume after a killed rank, and the
combinations that cannot work (issue 12)."""

import json
import math

import mlx.core as mx
import pytest
from conftest import PY, REPO, fine_tune_cmd, mlx_launch, mpirun, read_train_losses, run

# The saved weights are compared at a learning rate of 1e-5. Adam divides each gradient by
# its running RMS, so where a gradient is near zero, rounding-level differences (another
# summation order: 2 ranks, a split matrix) move the weight by a good fraction of the
# learning rate per step. Measured on the tiny model after 5 steps at 1e-4: 2 ranks
# without sharding differ from 1 rank by 6e-6, tensor-parallel full fine-tuning by 1.6e-5
# (at 5e-4, LoRA: 5e-5 without sharding). At 1e-5 every mode agrees within 1e-5, while a
# piece gathered into the wrong place would differ by the weights themselves (~0.05).
# That the step computes the 1-rank gradient is checked directly, within 1e-5 relative
# (test_step_gradient_is_the_one_rank_gradient).
ARGS = ["--iters", "5", "--steps-per-report", "1", "--steps-per-eval", "100",
        "--val-batches", "1", "--seed", "2", "--learning-rate", "1e-5", "--num-layers", "-1"]
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) >= 5
    return max(abs(a[k] - b[k]) / abs(a[k]) for k in a)


def _weights(folder):
    return mx.load(str(folder / "adapters.safetensors"))


def _max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


@pytest.fixture(scope="module")
def check_lines(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    run(mpirun(2, PY, REPO / "tests" / "scripts" / "sharding_check.py", out))
    lines = [json.loads(line) for r in (0, 1) for line in open(out / f"rank{r}.jsonl")]
    assert len(lines) == 8  # 2 modes x 2 fine-tune types x 2 ranks
    return lines


@pytest.mark.distributed
def test_step_gradient_is_the_one_rank_gradient(check_lines):
    for line in check_lines:
        assert line["size"] == 2
        assert line["max_rel_grad_error"] < 1e-5, line["case"]
        assert line["zero_gradients"] == []  # LoRA's A and B both have a gradient
    assert {line["reduce_scatter"] for line in check_lines
            if line["case"].startswith("fsdp")} == {"all_sum + slice"}  # MPI: no sum_scatter


@pytest.mark.distributed
def test_each_rank_holds_half_of_every_sharded_array(check_lines):
    by_case = {}
    for line in check_lines:
        by_case.setdefault(line["case"], {})[line["rank"]] = line["held"]
    for case, ranks in by_case.items():
        mode, ftype = case.split("/")
        assert ranks[0].keys() == ranks[1].keys()
        held = ranks[0]
        trainable = [p for p, h in held.items() if h["trainable"]]
        assert trainable and (ftype == "full") == all(".lora_" not in p for p in trainable)
        for path, h in held.items():
            assert h == ranks[1][path]
            name = path.split(".")
            if mode == "fsdp":
                expected = 0  # everything, along axis 0
            elif "lora_a" in name:
                expected = 0 if name[-2] in ROW else None
            elif "lora_b" in name:
                expected = 1 if name[-2] in COLUMN else None
            elif name[-1] == "weight" and set(name) & set(COLUMN):
                expected = 0
            elif name[-1] == "weight" and set(name) & set(ROW):
                expected = -1
            else:
                expected = None  # embedding, norms: whole on every rank
            assert h["axis"] == expected, (case, path)
            if expected is None:
                assert h["shape"] == h["whole"]
            else:
                assert h["shape"][expected] * 2 == h["whole"][expected]
                assert math.prod(h["shape"]) * 2 == math.prod(h["whole"])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model):
    out = {}
    for ftype in ("lora", "full"):
        out[ftype] = tmp_path_factory.mktemp(f"solo-{ftype}")
        run(fine_tune_cmd(*ARGS, "--fine-tune-type", ftype, "--adapter-path", out[ftype]))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["fsdp", "tensor"])
@pytest.mark.parametrize("ftype", ["lora", "full"])
def test_two_sharded_ranks_follow_one_rank_and_save_its_weights(one_rank, tmp_path, mode,
                                                                ftype):
    proc = run(mpirun(2, *fine_tune_cmd(*ARGS, "--fine-tune-type", ftype, "--sharding", mode,
                                        "--adapter-path", tmp_path)))
    assert f"Sharding {mode}:" in proc.stdout
    solo = one_rank[ftype]
    losses, ref = read_train_losses(tmp_path), read_train_losses(solo)
    assert list(losses) == [1, 2, 3, 4, 5] and _max_rel(ref, losses) < 1e-4
    saved, whole = _weights(tmp_path), _weights(solo)
    assert all(saved[k].shape == whole[k].shape for k in whole)  # gathered whole
    assert _max_weight_diff(saved, whole) < 1e-5
    summary = json.loads((tmp_path / "summary.json").read_text())
    held = summary["sharding"]
    assert held["mode"] == mode and held["trainable"] == json.loads(
        (solo / "summary.json").read_text())["trainable_parameters"]
    if mode == "fsdp":
        assert held["parameters_held"] * 2 == held["parameters"]
        assert summary["per_rank_batch"] == 4
    else:
        assert held["parameters"] / 2 < held["parameters_held"] < held["parameters"]
        assert summary["per_rank_batch"] == 8  # every rank computes the whole batch
    assert len(summary["peak_memory_gb_per_rank"]) == 2
    sent = summary["collective_bytes_per_step"]["sent_bytes"]
    if mode == "fsdp":  # the bytes course_lib.memory explains, to the token count's 4 bytes
        from course_lib import memory

        built = memory.collective_bytes(memory.model_config("tiny"), "fsdp", 2, 8, 64, ftype,
                                        -1, 8)
        assert abs(sent - built["as_built"]) <= 8
    else:  # activations: the rows' width varies
        assert sent > 0
    # mlx_lm loads what was saved (adapter config and weights) onto the unsharded model.
    from mlx_lm import load

    if ftype == "lora":
        load(str(json.loads((tmp_path / "adapter_config.json").read_text())["model"]),
             adapter_path=str(tmp_path))


@pytest.mark.distributed
def test_fsdp_under_the_ring_backend_follows_one_rank(one_rank, tmp_path):
    run(mlx_launch(2, *fine_tune_cmd(*ARGS, "--sharding", "fsdp", "--adapter-path", tmp_path)))
    assert _max_rel(read_train_losses(one_rank["lora"]), read_train_losses(tmp_path)) < 1e-4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["backend"], summary["sharding"]["reduce_scatter"]) == ("ring",
                                                                           "all_sum + slice")


RESUME = ["--iters", "8", "--steps-per-report", "1", "--steps-per-eval", "100",
          "--val-batches", "1", "--save-every", "3", "--seed", "1"]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["fsdp", "tensor"])
def test_killed_sharded_run_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model, mode):
    from course_lib import checkpoint, launch

    whole, out = tmp_path / "whole", tmp_path / "run"
    cmd = ["--sharding", mode, "--fine-tune-type", "full" if mode == "tensor" else "lora"]
    run(mpirun(2, *fine_tune_cmd(*RESUME, *cmd, "--adapter-path", whole)))
    proc = run(mpirun(2, *fine_tune_cmd(*RESUME, *cmd, "--adapter-path", out)), check=False,
               env=launch.child_env(COURSE_LIB_FAULT="kill-rank-1@5"), timeout=120)
    assert proc.returncode != 0 and checkpoint.latest(out) == 3
    # The checkpoint holds whole arrays, as an unsharded run's does.
    first = mx.load(str(out / "0000003_adapters.safetensors"))
    assert first.keys() == _weights(whole).keys()
    assert all(first[k].shape == v.shape for k, v in _weights(whole).items())
    proc = run(mpirun(2, *fine_tune_cmd(*RESUME, *cmd, "--resume", "--adapter-path", out)))
    assert "Resuming from the checkpoint at iteration 3" in proc.stdout
    done, ref = read_train_losses(out), read_train_losses(whole)
    assert sorted(done) == list(range(1, 9)) and _max_rel(ref, done) < 1e-5
    assert _max_weight_diff(_weights(out), _weights(whole)) < 1e-5


@pytest.mark.parametrize("ranks,extra,message", [
    (1, ["--sharding", "fsdp"], "--sharding fsdp splits the model across ranks and needs at "
                                "least 2"),
    (1, ["--sharding", "tensor"], "--sharding tensor splits the model across ranks"),
    (2, ["--sharding", "tensor", "--fine-tune-type", "dora"],
     "--sharding tensor works with --fine-tune-type lora or full, not dora"),
    (2, ["--sharding", "fsdp", "--lora-dropout", "0.1"], "use --lora-dropout 0"),
    (2, ["--sharding", "fsdp", "--loss-weighting", "ranks"], "--loss-weighting ranks is for"),
    (2, ["--sharding", "tensor", "--compile"], "leave out --compile"),
    (3, ["--sharding", "tensor"], "its width 512 does not divide by 3 ranks"),
    (3, ["--sharding", "fsdp", "--fine-tune-type", "full"],
     "model.layers.0.mlp.gate_proj.weight (512, 192) does not divide by 3 ranks"),
])
def test_combinations_that_cannot_work_fail_first(tmp_path, tiny_model, ranks, extra, message):
    out = tmp_path / "out"
    cmd = fine_tune_cmd(*ARGS, "--batch-size", "6", *extra, "--adapter-path", out)
    proc = run(mpirun(ranks, *cmd) if ranks > 1 else cmd, check=False, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
