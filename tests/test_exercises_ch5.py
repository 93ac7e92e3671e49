"""Chapter 5's exercises: each check rejects the stub and every typical wrong answer with the
message meant for it, and accepts the course's solution (accumulation on 2 real ranks under
mpirun); the solutions agree with the full batch and with course_lib's cost model."""

import numpy as np
import pytest

from course_lib.exercises import ch5

EXERCISES = [ch5.accumulate, ch5.amdahl, ch5.ring_cost]


def cases():
    for ex in EXERCISES:
        marks = [pytest.mark.distributed] if ex.ranks > 1 else []
        yield pytest.param(ex, ex.stub, "not done yet", False, id=f"{ex.name}-stub", marks=marks)
        yield pytest.param(ex, ex.reference, None, True, id=f"{ex.name}-solution", marks=marks)
        for fn, message in ex.mistakes:
            yield pytest.param(ex, fn, message, False, id=f"{ex.name}-{fn.__name__}",
                               marks=marks)


@pytest.mark.parametrize("ex, fn, message, passes", list(cases()))
def test_check_tells_each_answer_apart(ex, fn, message, passes):
    v = ex.verdict(fn)
    assert v.passed is passes, str(v)
    assert "Traceback" not in v.message
    if fn is ex.stub:
        assert message in v.message
    elif message is not None:
        assert v.message in (message, f"rank 0: {message}", f"rank 1: {message}"), str(v)


def test_every_exercise_names_at_least_two_mistakes_each_with_its_own_message():
    for ex in EXERCISES:
        messages = [m for _, m in ex.mistakes]
        assert len(messages) >= 2 and len(set(messages)) == len(messages)


def test_accumulated_token_sums_equal_the_full_batch_gradient():
    # What the 2-rank solution computes, added up by hand in one process: every micro-batch's
    # token sum over every token; and the micro-batches' token counts differ.
    sums, counts = [], []
    for rank in range(2):
        micro_batches, grad_sum_fn, _ = ch5.accumulate_args(rank, 2, None)
        for batch in micro_batches:
            g, n = grad_sum_fn(batch)
            sums.append(np.array(g))
            counts.append(int(n.item()))
    assert len(set(counts)) == len(counts)
    np.testing.assert_allclose(sum(sums) / sum(counts), np.array(ch5.full_batch_gradient()),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_ring_solution_is_course_libs_cost_model(n):
    from course_lib.traffic import ring_all_reduce_seconds

    nbytes, _, bps, latency = ch5.ring_args(0, 1, None)
    assert ch5.ring_solution(nbytes, n, bps, latency) == pytest.approx(
        ring_all_reduce_seconds(nbytes, n, bps, latency), rel=1e-12)


def test_amdahl_solution_is_chapter_5s_law():
    serial, parallel, n = ch5.amdahl_args(0, 1, None)
    s = serial / (serial + parallel)
    assert ch5.amdahl_solution(serial, parallel, n) == pytest.approx(1 / (s + (1 - s) / n))
