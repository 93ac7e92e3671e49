"""Chapter 3's exercises (reduce-scatter, all-gather, broadcast from all_sum): check() starts 2
real ranks under mpirun, rejects the stub and each typical wrong answer with the message meant
for it, and accepts the course's solution."""

import pytest

from course_lib.exercises import ch3

EXERCISES = [ch3.reduce_scatter, ch3.all_gather, ch3.broadcast]
MISTAKES = [(ex, fn, message) for ex in EXERCISES for fn, message in ex.mistakes]


@pytest.mark.distributed
@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.name)
def test_stub_is_not_done_yet(ex):
    v = ex.verdict(ex.stub)
    assert not v.passed and "not done yet" in v.message


@pytest.mark.distributed
@pytest.mark.parametrize("ex,fn,message", MISTAKES, ids=[fn.__name__ for _, fn, _ in MISTAKES])
def test_each_mistake_gets_its_message(ex, fn, message):
    v = ex.verdict(fn)
    assert not v.passed
    assert v.message == f"rank 0: {message}"


@pytest.mark.distributed
@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.name)
def test_solution_passes(ex):
    v = ex.verdict(ex.reference)
    assert v.passed, v.message


def test_the_named_mistakes_are_there():
    names = {fn.__name__ for _, fn, _ in MISTAKES}
    assert {"reduce_scatter_whole", "reduce_scatter_next_chunk", "reduce_scatter_unsummed",
            "all_gather_reversed", "all_gather_repeated",
            "broadcast_from_rank0", "broadcast_not_zeroed"} <= names


def test_the_broadcast_check_uses_a_root_other_than_rank_0():
    assert ch3.broadcast_args(0, 2, None)[2] != 0


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.name)
def test_the_notebook_poses_the_stub_verbatim(ex):
    import inspect
    import json
    from pathlib import Path

    nb = Path(__file__).resolve().parent.parent / "notebooks" / "exercises" / "03_mpi_setup_exercises.ipynb"
    sources = ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"]]
    assert inspect.getsource(ex.stub).rstrip("\n") in sources
    assert f"ch3.{ex.name.split('.')[1]}.check({ex.stub.__name__})" in sources
