"""The options resolved once into a Plan: the recipe filled in, every check made, every
derived choice computed, the namespace left as it was; and the exit statuses."""

import argparse

import pytest


def test_a_plan_fills_the_recipe_and_derives_its_choices(monkeypatch):
    import mlx.core as mx

    from course_lib.fine_tune import build_parser, resolve

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)  # a CPU, also on a Mac
    args = build_parser().parse_args(["--model", "smollm2:float32", "--lora-alpha", "16"])
    before = dict(vars(args))
    plan = resolve(args, world_size=2, backend="mpi")
    assert vars(args) == before                       # the namespace is not edited
    assert (plan.recipe, plan.iters, plan.num_layers, plan.batch_size) == ("smollm2", 24, 8, 8)
    assert plan.lora_parameters == {"rank": 8, "scale": 2.0, "dropout": 0.0, "alpha": 16.0}
    assert (plan.compile, plan.loss, plan.pad_multiple) == (False, "scored", 1)
    assert plan.rows_per_rank == 4 and plan.all_reduce == "plain"
    assert plan.options["iters"] == 24 and plan.options["compile"] is None
    compiled = resolve(build_parser().parse_args(["--model", "tiny", "--compile"]))
    assert (compiled.compile, compiled.loss, compiled.pad_multiple, compiled.streams) == \
        (True, "all", 32, 1)


def test_the_all_reduce_form_follows_the_backend(monkeypatch):
    from course_lib.fine_tune import parse

    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_RANK"):  # no launcher's
        monkeypatch.delenv(name, raising=False)
    assert parse(["--model", "tiny"], 2, "ring").all_reduce == "bucketed"
    assert parse(["--model", "tiny"], 1, "ring").all_reduce == "plain"
    assert parse(["--model", "tiny"], 2, "mpi").all_reduce == "plain"
    assert parse(["--model", "tiny", "--all-reduce", "bucketed"], 2, "mpi").all_reduce == \
        "bucketed"


def test_sharding_is_never_compiled_and_needs_two_ranks():
    from course_lib.fine_tune import UsageError, parse

    plan = parse(["--model", "tiny", "--sharding", "fsdp"], 2)
    assert (plan.compile, plan.streams, plan.options["compile"]) == (False, 1, False)
    assert plan.rows_per_rank == 4
    assert parse(["--model", "tiny", "--sharding", "tensor"], 2).rows_per_rank == 8
    with pytest.raises(UsageError, match="needs at least 2"):
        parse(["--model", "tiny", "--sharding", "fsdp"], 1)
    with pytest.raises(UsageError, match="leave out --compile"):
        parse(["--model", "tiny", "--sharding", "tensor", "--compile"], 2)


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "6"], "not divisible by the world size 4"),
    (["--fine-tune-type", "full", "--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["--lora-alpha", "8", "--lora-scale", "2"], "not both"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--streams", "2", "--sharding", "fsdp"], "needs --sharding none"),
    (["--report-to", "nothing"], "is not one of"),
])
def test_bad_options_are_named(argv, message):
    from course_lib.fine_tune import UsageError, parse

    with pytest.raises(UsageError, match=message):
        parse(["--model", "tiny", *argv], 4)


def test_a_plan_literal_that_contradicts_itself_is_refused():
    from course_lib.fine_tune import Plan

    assert Plan().pad_multiple == 1
    Plan(compile=True, loss="all", pad_multiple=32)
    with pytest.raises(ValueError, match="compiled"):
        Plan(compile=True)
    with pytest.raises(ValueError, match="rank"):
        Plan(lora_rank=4)
    with pytest.raises(ValueError, match="one stream"):
        Plan(streams=2, sharding="fsdp")


def test_exit_statuses_are_decided_in_one_place():
    from course_lib.atomic import WriteError
    from course_lib.data import DataError
    from course_lib.fine_tune import errors
    from course_lib.fine_tune.interrupts import Interrupted, StoppedByRankZero

    assert errors.exit_status(errors.UsageError("x")) == errors.USAGE == 2
    assert errors.exit_status(DataError("x")) == 2
    assert errors.exit_status(WriteError("f", OSError(28, "full"))) == errors.WRITE_FAILED == 5
    assert errors.exit_status(StoppedByRankZero(5)) == 5
    assert errors.exit_status(Interrupted(15, {0: 15}, 3, 3)) == 143
    assert errors.exit_status(KeyboardInterrupt()) == 130
    with pytest.raises(TypeError):
        errors.exit_status(argparse.ArgumentError(None, "x"))
