"""Chapter 2's exercises: check() rejects the stub and each typical wrong answer with the
message meant for it, and accepts the course's solution (each check runs one fresh process)."""

import pytest

from course_lib.exercises import ch2

EXERCISES = [ch2.split, ch2.drop_long]
MISTAKES = [(ex, fn, message) for ex in EXERCISES for fn, message in ex.mistakes]


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.name)
def test_stub_is_not_done_yet(ex):
    v = ex.verdict(ex.stub)
    assert not v.passed and "not done yet" in v.message


@pytest.mark.parametrize("ex,fn,message", MISTAKES, ids=[fn.__name__ for _, fn, _ in MISTAKES])
def test_each_mistake_gets_its_message(ex, fn, message):
    v = ex.verdict(fn)
    assert not v.passed
    assert v.message == message


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.name)
def test_solution_passes(ex):
    v = ex.verdict(ex.reference)
    assert v.passed, v.message


def test_the_named_mistakes_are_there():
    names = {fn.__name__ for _, fn, _ in MISTAKES}
    assert {"split_ignores_categories", "split_overlap", "split_off_by_one",
            "drop_long_truncated", "drop_long_strict"} <= names


def test_split_keeps_each_categorys_share():
    (rows,) = ch2.split_args(0, 1, None)
    train, valid = ch2.split_solution(rows)
    assert sorted(train + valid) == sorted(r["id"] for r in rows)  # each row exactly once
    assert not set(train) & set(valid)
    for category, n in ch2.CATEGORIES.items():
        assert n % 5  # no category a multiple of 5: the rounding is visible
        ids = {r["id"] for r in rows if r["category"] == category}
        assert len(ids & set(valid)) == n // 5


def test_drop_long_has_a_record_exactly_at_the_limit():
    records, count, limit = ch2.drop_long_args(0, 1, None)
    counts = [count(r) for r in records]
    assert limit in counts and any(c > limit for c in counts) and any(c < limit for c in counts)


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.name)
def test_the_notebook_poses_the_stub_verbatim(ex):
    import inspect
    import json
    from pathlib import Path

    nb = Path(__file__).resolve().parent.parent / "notebooks" / "exercises" / "02_dataset_preparation_exercises.ipynb"
    sources = ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"]]
    assert inspect.getsource(ex.stub).rstrip("\n") in sources
    assert f"ch2.{ex.name.split('.')[1]}.check({ex.stub.__name__})" in sources
