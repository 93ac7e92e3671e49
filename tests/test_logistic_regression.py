"""Chapter 1's model: hand gradients, and data-parallel training equal to full batch."""

import mlx.core as mx
import pytest
from conftest import PY, REPO, json_objects, mpirun, run

from course_lib import logistic_regression as lr


def test_or_is_learned_to_full_accuracy():
    X, y = lr.or_dataset()
    params, history = lr.train_full_batch(X, y, learning_rate=1.0, epochs=300)
    assert lr.accuracy(params, X, y) == 1.0
    assert history[-1]["loss"] < history[0]["loss"] / 4


def test_hand_gradients_match_autodiff():
    X, y = lr.or_dataset()
    params = lr.init_params(2, seed=5)
    auto = mx.grad(lr.bce_loss)(params, X, y)
    hand = lr.manual_gradients(params, X, y)
    for k in ("w", "b"):
        assert mx.allclose(auto[k], hand[k], atol=1e-6).item(), k


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_data_parallel_equals_full_batch_step_for_step(workers):
    X, y = lr.or_dataset()
    full, h_full = lr.train_full_batch(X, y, epochs=60)
    par, h_par = lr.train_data_parallel(X, y, workers, epochs=60)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(h_full, h_par)) < 1e-6
    assert mx.allclose(full["w"], par["w"], atol=1e-5).item()


def test_unweighted_mean_of_uneven_shards_is_not_the_full_gradient():
    X, y = lr.or_dataset()
    params = lr.init_params(2)
    shards = lr.shard(X, y, 3)  # sizes 1, 2, 1
    grads = [lr.manual_gradients(params, Xs, ys) for Xs, ys in shards]
    full = lr.manual_gradients(params, X, y)
    weighted = lr.average_shard_gradients(grads, [len(ys) for _, ys in shards])
    plain = {k: sum(g[k] for g in grads) / 3 for k in full}
    assert mx.allclose(weighted["w"], full["w"], atol=1e-7).item()
    assert not mx.allclose(plain["w"], full["w"], atol=1e-4).item()
    with pytest.raises(ValueError, match="n_workers must be between 1 and the 4 rows"):
        lr.shard(X, y, 5)


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [2, 3])
def test_real_ranks_equal_full_batch(ranks):
    proc = run(mpirun(ranks, PY, REPO / "tests" / "scripts" / "lr_ranks.py"), timeout=120)
    results = json_objects(proc.stdout)
    assert len(results) == ranks
    X, y = lr.or_dataset()
    full, history = lr.train_full_batch(X, y, epochs=50)
    for r in results:
        assert max(abs(a - b["loss"]) for a, b in zip(r["losses"], history)) < 1e-6
        assert abs(r["b"] - full["b"].item()) < 1e-5
