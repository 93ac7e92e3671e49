"""Chapter 1's exercises: logistic regression's gradient by hand, and averaging gradients
over shards of unequal size on 2 ranks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from course_lib.exercises.core import Exercise

# 1. The gradient by hand ---------------------------------------------------------------


def gradient_args(rank, size, group):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(8, 3)).astype(np.float32)
    y = (rng.random(8) > 0.5).astype(np.float32)
    w = rng.normal(size=3).astype(np.float32)
    return mx.array(w), mx.array(np.float32(0.3)), mx.array(X), mx.array(y)


def my_gradient(w, b, X, y):
    """The gradient of the mean binary cross-entropy of p = sigmoid(X @ w + b).

    w: (d,), b: a scalar array, X: (n, d), y: (n,) of 0.0 and 1.0, all float32.
    Return (dw, db): dw of shape (d,), db a scalar array."""
    raise NotImplementedError("your code here")


def gradient_solution(w, b, X, y):
    p = mx.sigmoid(X @ w + b)
    error = p - y                       # d(loss)/d(logit) for each row
    return X.T @ error / X.shape[0], mx.mean(error)


def gradient_summed(w, b, X, y):
    error = mx.sigmoid(X @ w + b) - y
    return X.T @ error, mx.sum(error)


def gradient_uphill(w, b, X, y):
    error = y - mx.sigmoid(X @ w + b)
    return X.T @ error / X.shape[0], mx.mean(error)


def gradient_logits(w, b, X, y):
    error = X @ w + b - y
    return X.T @ error / X.shape[0], mx.mean(error)


def gradient_explain(got, want, args, rel):
    return (f"your (dw, db) equals the course's, which mx.grad checks in the chapter "
            f"(largest relative difference {rel:.1g})")


gradient = Exercise(
    name="ch1.gradient", title="Logistic regression's gradient, by hand", ranks=1,
    make_args=gradient_args, reference=gradient_solution, stub=my_gradient,
    explain=gradient_explain,
    hint_text=("the loss of one row is -(y log p + (1 - y) log(1 - p)); its derivative with "
               "respect to the logit z = x.w + b is p - y. Chain it: dw is the mean over rows "
               "of (p - y) x, db the mean of (p - y)."),
    mistakes=[
        (gradient_summed, "your gradient is n times too large (n = the rows in the batch): "
                          "the loss is a mean over rows, so average (p - y) x, don't sum it"),
        (gradient_uphill, "your gradient points uphill: the derivative is p - y, not y - p "
                          "(gradient descent subtracts it)"),
        (gradient_logits, "you used the logits X @ w + b where the probabilities "
                          "p = sigmoid(X @ w + b) belong"),
    ])


# 2. Averaging over unequal shards, on 2 ranks --------------------------------------------

ROWS = (3, 5)   # rank 0 holds 3 rows, rank 1 holds 5


def average_args(rank, size, group):
    rng = np.random.default_rng(10 + rank)
    local_grad = rng.normal(size=4).astype(np.float32)
    return mx.array(local_grad), ROWS[rank], group


def my_average(local_grad, local_rows, group):
    """This rank's gradient, averaged over its own ``local_rows`` rows (shape (d,), float32).

    Return the full-batch gradient, the mean over every row of every rank, the same on
    every rank. Use mx.distributed.all_sum(x, group=group)."""
    raise NotImplementedError("your code here")


def average_solution(local_grad, local_rows, group):
    rows = mx.distributed.all_sum(mx.array(float(local_rows)), group=group)
    return mx.distributed.all_sum(local_grad * local_rows, group=group) / rows


def average_unweighted(local_grad, local_rows, group):
    return mx.distributed.all_sum(local_grad, group=group) / group.size()


def average_summed(local_grad, local_rows, group):
    return mx.distributed.all_sum(local_grad, group=group)


def average_local(local_grad, local_rows, group):
    return local_grad


def average_local_rows(local_grad, local_rows, group):
    return mx.distributed.all_sum(local_grad * local_rows, group=group) / local_rows


def average_explain(got, want, args, rel):
    return ("every rank holds the full-batch gradient: each shard weighted by its rows "
            f"(3 and 5) (largest relative difference {rel:.1g})")


average = Exercise(
    name="ch1.average", title="Averaging gradients over shards of unequal size", ranks=2,
    make_args=average_args, reference=average_solution, stub=my_average,
    explain=average_explain,
    hint_text=("a mean over all rows is (sum of every row's gradient) / (number of rows). "
               "local_grad * local_rows is this rank's sum; all_sum adds the ranks' sums, "
               "and all_sum of local_rows counts every row."),
    mistakes=[
        (average_unweighted, "you averaged the ranks' gradients unweighted: rank 0 has 3 rows "
                             "and rank 1 has 5, so weight each gradient by its rows"),
        (average_summed, "your result is the sum over the ranks, about 2x too large: divide "
                         "by the rows"),
        (average_local, "you returned this rank's own gradient: combine the ranks' "
                        "gradients with all_sum"),
        (average_local_rows, "you divided by this rank's rows: divide by every rank's rows "
                             "together (all_sum them too)"),
    ])
