"""Logistic regression from scratch in MLX: the course's first model, and its bridge to
data-parallel training.

The model is ``p = sigmoid(X @ w + b)`` with ``X`` of shape ``(n, d)`` float32, ``w`` of
shape ``(d,)`` and ``b`` a scalar; the loss is the mean binary cross-entropy
``-mean(y log p + (1 - y) log(1 - p))``. Its gradients, derived by hand
(e.g. Bishop, *Pattern Recognition and Machine Learning*, eq. 4.91):

    dL/dw = X^T (p - y) / n        dL/db = mean(p - y)

Data parallelism in miniature: split the rows across workers, let each compute the gradient
of its own mean loss, and average those gradients weighted by each worker's share of the
rows. The result is exactly the full-batch gradient, so every worker takes the full-batch
step (:func:`train_data_parallel` simulates the workers in one process;
:func:`train_distributed` does it with real ranks and ``all_reduce_grads``).
"""

from __future__ import annotations

import mlx.core as mx

from course_lib.distributed import all_reduce_grads, all_sum


def or_dataset() -> tuple[mx.array, mx.array]:
    """The OR truth table: ``X`` (4, 2) float32 inputs, ``y`` (4,) float32 labels."""
    X = mx.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=mx.float32)
    y = mx.array([0, 1, 1, 1], dtype=mx.float32)
    return X, y


def init_params(n_features: int, seed: int = 0) -> dict:
    """``{"w": (n_features,), "b": ()}`` float32, ``w`` drawn from N(0, 0.1^2) (seeded), ``b`` = 0."""
    key = mx.random.key(seed)
    return {"w": 0.1 * mx.random.normal((n_features,), key=key), "b": mx.array(0.0)}


def sigmoid(z: mx.array) -> mx.array:
    """``1 / (1 + exp(-z))``, element-wise."""
    return 1.0 / (1.0 + mx.exp(-z))


def predict_proba(params: dict, X: mx.array) -> mx.array:
    """P(y = 1 | x) for each row of ``X``: shape (n,)."""
    return sigmoid(X @ params["w"] + params["b"])


def predict(params: dict, X: mx.array) -> mx.array:
    """Class labels (0.0 or 1.0) at the 0.5 threshold: shape (n,)."""
    return (predict_proba(params, X) >= 0.5).astype(mx.float32)


def bce_loss(params: dict, X: mx.array, y: mx.array, eps: float = 1e-7) -> mx.array:
    """Mean binary cross-entropy (nats), a scalar; ``p`` clipped to [eps, 1 - eps]."""
    p = mx.clip(predict_proba(params, X), eps, 1 - eps)
    return -mx.mean(y * mx.log(p) + (1 - y) * mx.log(1 - p))


def manual_gradients(params: dict, X: mx.array, y: mx.array) -> dict:
    """The hand-derived gradient of :func:`bce_loss`: ``{"w": X^T (p - y) / n,
    "b": mean(p - y)}``."""
    error = predict_proba(params, X) - y
    return {"w": X.T @ error / X.shape[0], "b": mx.mean(error)}


def sgd_step(params: dict, grads: dict, learning_rate: float) -> dict:
    """``params - learning_rate * grads``, leaf by leaf."""
    return {k: params[k] - learning_rate * grads[k] for k in params}


def accuracy(params: dict, X: mx.array, y: mx.array) -> float:
    """Share of rows classified correctly, 0.0 to 1.0."""
    return mx.mean(predict(params, X) == y).item()


def train_full_batch(X: mx.array, y: mx.array, learning_rate: float = 1.0,
                     epochs: int = 200, seed: int = 0) -> tuple[dict, list[dict]]:
    """Gradient descent on all rows at once. Returns ``(params, history)`` where history
    has one ``{"epoch", "loss", "w", "b"}`` per epoch (before that epoch's step)."""
    params = init_params(X.shape[1], seed)
    history = []
    for epoch in range(epochs):
        history.append(_snapshot(epoch, params, X, y))
        params = sgd_step(params, manual_gradients(params, X, y), learning_rate)
    return params, history


def shard(X: mx.array, y: mx.array, n_workers: int) -> list[tuple[mx.array, mx.array]]:
    """Split rows into ``n_workers`` contiguous shards, sizes differing by at most one."""
    n = X.shape[0]
    if not 1 <= n_workers <= n:
        raise ValueError(f"n_workers must be between 1 and the {n} rows, got {n_workers}")
    bounds = [round(i * n / n_workers) for i in range(n_workers + 1)]
    return [(X[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]


def average_shard_gradients(grads: list[dict], sizes: list[int]) -> dict:
    """The full-batch gradient from per-shard mean gradients: each weighted by its share of
    the rows (with equal shards, the plain mean)."""
    total = sum(sizes)
    return {k: sum(g[k] * (s / total) for g, s in zip(grads, sizes)) for k in grads[0]}


def train_data_parallel(X: mx.array, y: mx.array, n_workers: int, learning_rate: float = 1.0,
                        epochs: int = 200, seed: int = 0) -> tuple[dict, list[dict]]:
    """:func:`train_full_batch`, but each step's gradient comes from ``n_workers``
    simulated workers, one shard each, averaged by :func:`average_shard_gradients`."""
    shards = shard(X, y, n_workers)
    params = init_params(X.shape[1], seed)
    history = []
    for epoch in range(epochs):
        history.append(_snapshot(epoch, params, X, y))
        grads = [manual_gradients(params, Xs, ys) for Xs, ys in shards]
        params = sgd_step(params, average_shard_gradients(grads, [len(ys) for _, ys in shards]),
                          learning_rate)
    return params, history


def train_distributed(X: mx.array, y: mx.array, learning_rate: float = 1.0, epochs: int = 200,
                      seed: int = 0, group=None, params: dict | None = None
                      ) -> tuple[dict, list[dict]]:
    """Data-parallel training across real ranks (run it under ``mpirun``/``mlx.launch``).

    Rank r of N takes shard r; each step its gradient is weighted by ``N * n_r / n`` and
    ``all_reduce_grads`` averages, giving the full-batch gradient on every rank. The ranks
    start from ``params`` (which must be the same on every rank, e.g. broadcast from rank
    0) or, by default, from ``init_params`` with the same ``seed``.
    """
    group = group or mx.distributed.init()
    Xs, ys = shard(X, y, group.size())[group.rank()]
    weight = group.size() * ys.shape[0] / all_sum(ys.shape[0], group).item()
    params = params if params is not None else init_params(X.shape[1], seed)
    history = []
    for epoch in range(epochs):
        history.append(_snapshot(epoch, params, X, y))
        local = manual_gradients(params, Xs, ys)
        grads = all_reduce_grads({k: g * weight for k, g in local.items()}, group)
        params = sgd_step(params, grads, learning_rate)
    return params, history


def _snapshot(epoch: int, params: dict, X: mx.array, y: mx.array) -> dict:
    return {"epoch": epoch, "loss": bce_loss(params, X, y).item(),
            "w": params["w"].tolist(), "b": params["b"].item()}
