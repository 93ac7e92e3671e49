"""Chapter 4's exercises: each check rejects the stub and every typical wrong answer with the
message meant for it, and accepts the course's solution (token averaging on 2 real ranks
under mpirun); the solutions agree with mlx_lm and with chapter 4's printed count."""

import mlx.nn as nn
import numpy as np
import pytest

from course_lib.exercises import ch4

EXERCISES = [ch4.token_average, ch4.lora_forward, ch4.lora_parameters]


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


def test_lora_forward_solution_is_mlx_lms_lora_linear():
    from mlx_lm.tuner.lora import LoRALinear

    x, W, A, B, scale = ch4.forward_args(0, 1, None)
    layer = LoRALinear.from_base(nn.Linear(W.shape[1], W.shape[0], bias=False),
                                 r=A.shape[1], scale=scale)
    # mlx_lm's layout, the exercise's: weight (d_out, d_in), lora_a (d_in, r), lora_b (r, d_out)
    assert layer.linear.weight.shape == W.shape and layer.lora_a.shape == A.shape
    assert layer.lora_b.shape == B.shape
    layer.linear.weight, layer.lora_a, layer.lora_b = W, A, B
    np.testing.assert_allclose(np.array(ch4.forward_solution(x, W, A, B, scale)),
                               np.array(layer(x)), rtol=1e-5, atol=1e-6)


def test_lora_parameters_solution_gives_chapter_4s_count():
    # SmolLM2's 7 adapted matrices (q, k, v, o, gate, up, down) of the last 8 layers, rank 8:
    # chapter 4 prints 651,264 trainable parameters.
    matrices = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536),
                (1536, 576)]
    assert sum(ch4.count_solution(i, o, 8, 8) for i, o in matrices) == 651_264
