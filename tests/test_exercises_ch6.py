"""Chapter 6's exercises, checked as a learner would check them: the stub is "not done yet",
each typical wrong answer gets its own message, the solution passes (ZeRO-1's step, FSDP's
gather of a layer's weight and a row-parallel linear layer on 2 real ranks; the bytes per rank
of each mode on 1)."""

import numpy as np
import pytest

from course_lib.exercises import ch6


def cases(ex):
    """(exercise, function, the message its verdict must hold, passed) for the stub, every
    mistake and the solution of ``ex``; the 2-rank ones marked ``distributed``."""
    marks = [pytest.mark.distributed] if ex.ranks > 1 else []
    yield pytest.param(ex, ex.stub, "not done yet", False, id=f"{ex.name}-stub", marks=marks)
    for fn, message in ex.mistakes:
        yield pytest.param(ex, fn, message, False, id=f"{ex.name}-{fn.__name__}", marks=marks)
    yield pytest.param(ex, ex.reference, "", True, id=f"{ex.name}-solution", marks=marks)


@pytest.mark.parametrize("ex, fn, message, passed", [
    *cases(ch6.zero1), *cases(ch6.memory), *cases(ch6.fsdp_gather), *cases(ch6.tensor_parallel)])
def test_verdict(ex, fn, message, passed):
    v = ex.verdict(fn)
    assert v.passed is passed, v
    assert message in v.message
    assert "Traceback" not in v.message


def test_memory_answer_in_numbers():
    # 134,515,008 parameters at 4 ranks: 16, 4 + 4 + 8/4, 4 + 12/4, 16/4 bytes per parameter
    got = ch6.memory_solution(*ch6.memory_args(0, 1, None))
    p = ch6.SMOLLM2_PARAMETERS
    assert got == {"none": 16 * p, "zero1": 10 * p, "zero2": 7 * p, "fsdp": 4 * p}


def test_memory_dict_compared_key_by_key():
    # the harness compares dicts per key, with the exercise's tolerance
    from course_lib.exercises.harness import as_numpy, compare

    want = as_numpy({"a": 1.0, "b": 2.0})
    assert compare(as_numpy({"a": 1, "b": 2.0 * (1 + 1e-9)}), want, 1e-4, 0)[0]
    assert compare(as_numpy({"a": 1.0, "b": 3.0}), want, 1e-4, 0)[1].startswith("'b': differs")
    assert "keys ['a']" in compare(as_numpy({"a": 1.0}), want, 1e-4, 0)[1]


def test_fsdp_gather_inputs_square_and_unequal():
    # d_in == d_out (a missing .T is silent), and each rank has its own rows and shard
    x0, w0, _ = ch6.fsdp_gather_args(0, 2, None)
    x1, w1, _ = ch6.fsdp_gather_args(1, 2, None)
    assert w0.shape == w1.shape == (ch6.FSDP_D // 2, ch6.FSDP_D)
    assert x0.shape == (ch6.FSDP_ROWS, ch6.FSDP_D)
    assert not np.allclose(np.array(x0), np.array(x1))
    assert not np.allclose(np.array(w0), np.array(w1))


def test_tensor_parallel_parts_make_x_at_w_transposed():
    # the two ranks' partial products add up to the unsplit layer's output
    parts = [ch6.tensor_parallel_args(r, 2, None) for r in range(2)]
    x = np.concatenate([np.array(p[0]) for p in parts], axis=1)
    w = np.concatenate([np.array(p[1]) for p in parts], axis=1)
    partial = sum(np.array(p[0]) @ np.array(p[1]).T for p in parts)
    np.testing.assert_allclose(partial, x @ w.T, rtol=1e-5, atol=1e-6)
