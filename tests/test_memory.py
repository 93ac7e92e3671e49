"""course_lib.memory: its counts against the real models, its choices, its command line.
(Whether its predictions match measured peaks is benchmarks/sharding.py's table.)"""

import math

import pytest
from conftest import PY, run

from course_lib import memory
from course_lib.models import resolve


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def model(request):
    """``(config, lazily loaded model, name)``: shapes without reading the weights."""
    from mlx_lm import load

    m, _ = load(resolve(request.param), lazy=True)
    return memory.model_config(request.param), m, request.param


def _size(tree):
    from mlx.utils import tree_flatten

    return sum(math.prod(v.shape) for _, v in tree_flatten(tree))


def test_parameter_counts_are_the_models(model):
    config, m, _ = model
    counts = memory.parameter_counts(config)
    assert counts["total"] == _size(m.parameters())
    assert counts["embedding"] == math.prod(m.model.embed_tokens.weight.shape)
    assert counts["layers"] * sum(counts["per_layer"].values()) == _size(m.model.layers)


@pytest.mark.parametrize("ftype,layers", [("lora", 2), ("lora", -1), ("full", 3)])
def test_trainable_count_is_what_the_fine_tune_trains(model, ftype, layers):
    from course_lib.fine_tune import add_adapters, parse

    from mlx_lm import load

    config, _, name = model
    plan = parse(["--model", "tiny", "--fine-tune-type", ftype, "--num-layers", str(layers)])
    fresh, _ = load(resolve(name), lazy=True)
    n, _ = add_adapters(fresh, plan)
    assert memory.trainable_count(config, ftype, n, plan.lora_rank) == _size(
        fresh.trainable_parameters())


def test_the_terms_follow_each_mode(model):
    config, _, _ = model
    counts = memory.parameter_counts(config)
    kw = dict(fine_tune_type="full", num_layers=-1)
    none = memory.estimate(config, "none", 2, 8, 64, **kw)
    fsdp = memory.estimate(config, "fsdp", 2, 8, 64, **kw)
    assert none.weights == 4 * counts["total"] and fsdp.weights == none.weights / 2
    assert fsdp.adam == none.adam / 2
    assert fsdp.activations < none.activations  # blocks recomputed
    tensor = memory.estimate(config, "tensor", 2, 8, 64, **kw)
    per, split = counts["per_layer"], memory.tensor_split(config, 2)
    cut = per["mlp"] + (per["attention"] if split["attention"] else 0)
    assert tensor.weights == 4 * (counts["total"] - counts["layers"] * cut / 2)
    assert tensor.rows_per_rank == 8 and none.rows_per_rank == 4


def test_smollm2s_heads_do_not_divide_by_two():
    config = memory.model_config("smollm2")
    assert memory.tensor_split(config, 2) == {"attention": False, "mlp": True}
    assert memory.tensor_split(config, 3) == {"attention": True, "mlp": True}


def test_suggestion_prefers_data_parallelism_then_fsdp():
    config = memory.model_config("smollm2")
    kw = dict(fine_tune_type="full", num_layers=-1)
    need = {m: memory.estimate(config, m, 2, 8, 64, **kw).total for m in ("none", "fsdp")}
    assert need["fsdp"] < need["none"]
    assert memory.suggest(config, need["none"] * 1.01, 2, 8, 64, **kw)["mode"] == "none"
    middle = memory.suggest(config, (need["none"] + need["fsdp"]) / 2, 2, 8, 64, **kw)
    assert middle["mode"] == "fsdp" and middle["largest_batch"]["none"] < 8
    assert middle["largest_batch"]["fsdp"] >= 8
    none = memory.suggest(config, 1e6, 2, 8, 64, **kw)
    assert none["mode"] is None and "none fits even one row" in none["reason"]


def test_cli_prints_the_terms_and_refuses_what_cannot_run(tiny_model):
    proc = run([PY, "-m", "course_lib.memory", "--model", "tiny", "--ranks", "2",
                "--sharding", "fsdp", "--batch-size", "8", "--seq-length", "64",
                "--budget-gb", "1"])
    assert "peak" in proc.stdout and "--sharding none fits a global batch of 8" in proc.stdout
    proc = run([PY, "-m", "course_lib.memory", "--model", "tiny", "--ranks", "3",
                "--batch-size", "8"], check=False)
    assert proc.returncode == 2 and "not divisible by 3 ranks" in proc.stderr
    proc = run([PY, "-m", "course_lib.memory", "--model", "tiny", "--sharding", "tensor"],
               check=False)
    assert proc.returncode == 2 and "needs at least 2 ranks" in proc.stderr
