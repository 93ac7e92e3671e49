"""Chapter 1's exercises, checked as a learner would check them: the stub is "not done yet",
each typical wrong answer gets its own message, the solution passes. Here too, once, the
check's own failure modes: what a learner sees for a NameError, a syntax error, a value that
is not a function, a lambda, a rank that never finishes, a rank that raises, a wrong shape.

The learner's functions below live at module level: the check reads their source."""

import importlib
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.core import sigmoid  # in this file's namespace, not in the check's process

from course_lib.exercises import ch1


def cases(ex):
    """(exercise, function, the message its verdict must hold, passed) for the stub, every
    mistake and the solution of ``ex``; the 2-rank ones marked ``distributed``."""
    marks = [pytest.mark.distributed] if ex.ranks > 1 else []
    yield pytest.param(ex, ex.stub, "not done yet", False, id=f"{ex.name}-stub", marks=marks)
    for fn, message in ex.mistakes:
        yield pytest.param(ex, fn, message, False, id=f"{ex.name}-{fn.__name__}", marks=marks)
    yield pytest.param(ex, ex.reference, "", True, id=f"{ex.name}-solution", marks=marks)


@pytest.mark.parametrize("ex, fn, message, passed",
                         [*cases(ch1.gradient), *cases(ch1.average)])
def test_verdict(ex, fn, message, passed):
    v = ex.verdict(fn)
    assert v.passed is passed, v
    assert message in v.message
    assert "Traceback" not in v.message


def test_every_exercise_has_two_mistakes_or_more_each_with_its_own_message():
    for ex in (ch1.gradient, ch1.average):
        assert len(ex.mistakes) >= 2
        messages = [m for _, m in ex.mistakes]
        assert len(set(messages)) == len(messages)


# The check's failure modes ----------------------------------------------------------------


def my_gradient_name_error(w, b, X, y):
    p = sigmoid(X @ w + b)  # imported by this file (a notebook cell), not in the function
    return X.T @ (p - y) / X.shape[0], mx.mean(p - y)


def my_gradient_wrong_shape(w, b, X, y):
    error = mx.sigmoid(X @ w + b) - y
    return (X.T @ error / X.shape[0])[:2], mx.mean(error)


def my_gradient_one_array(w, b, X, y):
    error = mx.sigmoid(X @ w + b) - y
    return X.T @ error / X.shape[0]


def my_average_rank0_only(local_grad, local_rows, group):
    if group.rank() == 0:
        return mx.distributed.all_sum(local_grad * local_rows, group=group) / 8
    return local_grad


def my_average_raises_on_rank1(local_grad, local_rows, group):
    if group.rank() == 1:
        raise ValueError("rank 1 has no rows")
    return local_grad


my_gradient_lambda = lambda w, b, X, y: (w, b)  # noqa: E731 (a lambda, on purpose)


def test_name_error_names_the_line():
    v = ch1.gradient.verdict(my_gradient_name_error)
    assert not v.passed
    assert "NameError" in v.message and "sigmoid" in v.message
    assert "line 2 of your function" in v.message
    assert "import it there" in v.message


@pytest.mark.parametrize("broken, message", [
    ("def my_fn(x):\n    return x +\n", "syntax error on line 2 of your function"),
    ("def my_fn(x):\n    return (x +\n", "syntax error in your function"),   # not even tokenized
], ids=["invalid-syntax", "unclosed-bracket"])
def test_syntax_error_is_one_line(broken, message, tmp_path, monkeypatch):
    # A function with a syntax error cannot be defined; the check reads the source from its
    # file, so a function whose file was edited after it was run (a stale cell) shows it.
    (tmp_path / "learner_mod.py").write_text("def my_fn(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("learner_mod")
    try:
        (tmp_path / "learner_mod.py").write_text(broken)
        v = ch1.gradient.verdict(module.my_fn)
    finally:
        sys.modules.pop("learner_mod", None)
    assert not v.passed
    assert v.message.startswith(message), v.message


def test_a_value_that_is_not_a_function_is_refused():
    v = ch1.gradient.verdict(42)
    assert not v.passed
    assert "takes your function itself, not int" in v.message
    assert "check(my_function)" in v.message


def test_a_lambda_is_refused():
    v = ch1.gradient.verdict(my_gradient_lambda)
    assert not v.passed and "not a lambda" in v.message


def test_a_function_without_source_is_refused():
    v = ch1.gradient.verdict(max)
    assert not v.passed and "cannot read the source" in v.message


def test_wrong_shape_says_shape():
    v = ch1.gradient.verdict(my_gradient_wrong_shape)
    assert not v.passed
    assert v.message == "item 0: shape (2,) where the answer has shape (3,)"


def test_wrong_kind_of_result_says_what_was_returned():
    v = ch1.gradient.verdict(my_gradient_one_array)
    assert not v.passed
    assert v.message == "your function returned an array of shape (3,); the answer is a tuple of 2"


@pytest.mark.distributed
def test_a_collective_on_one_rank_only_never_finishes():
    v = ch1.average.verdict(my_average_rank0_only, timeout=10)
    assert not v.passed
    assert v.message.startswith("rank 0 never finished within 10 s"), v.message
    assert "all_sum" in v.message
    assert v.seconds < 30
    # mpirun's ranks (each in a process group of its own) are gone with it.
    left = subprocess.run(["pgrep", "-f", "course_lib.exercises.harness ch1.average"],
                          capture_output=True, text=True).stdout.split()
    assert left == [], f"ranks left running: {left}"


@pytest.mark.distributed
def test_an_exception_on_one_rank_names_the_rank():
    v = ch1.average.verdict(my_average_raises_on_rank1)
    assert not v.passed
    assert v.message.startswith("rank 1: your function raised ValueError: rank 1 has no rows")
    assert "line 3 of your function" in v.message


def test_solution_and_hint_print_for_every_exercise(capsys):
    """``solution()`` prints the course's answer (its source), ``hint()`` a hint, for every
    exercise of every chapter."""
    from course_lib.exercises import Exercise

    exercises = [value for chapter in ("ch1", "ch2", "ch3", "ch4", "ch5", "ch6")
                 for value in vars(importlib.import_module(f"course_lib.exercises.{chapter}"))
                 .values() if isinstance(value, Exercise)]
    assert len({ex.name for ex in exercises}) >= 12
    for ex in exercises:
        ex.solution()
        ex.hint()
        printed = capsys.readouterr().out
        assert printed.startswith(f"def {ex.reference.__name__}("), ex.name
        assert f"Hint ({ex.name}): " in printed
