"""Run under 2 ranks: all_reduce_grads of per-rank gradients vs the 1-process gradient.

Every rank builds the same small model and batch (same seed). Rank r takes rows r::N of
the batch; with the same number of rows per rank, the mean of the per-rank mean-loss
gradients must equal the whole-batch gradient. Prints one JSON line per rank.
"""
import json
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from course_lib.distributed import all_reduce_grads, init_world, print_line

group, backend = init_world(sys.argv[1] if len(sys.argv) > 1 else "auto")
rank, size = group.rank(), group.size()

mx.random.seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
x = mx.random.normal((8, 16))
y = mx.random.randint(0, 4, (8,))


def loss_fn(m, xb, yb):
    return nn.losses.cross_entropy(m(xb), yb, reduction="mean")


grad_fn = nn.value_and_grad(model, loss_fn)
_, full = grad_fn(model, x, y)
_, local = grad_fn(model, x[rank::size], y[rank::size])
averaged = all_reduce_grads(local, group)
mx.eval(full, local, averaged)

full_flat, avg_flat, local_flat = (dict(tree_flatten(t)) for t in (full, averaged, local))
rel = max(
    (mx.abs(avg_flat[k] - full_flat[k]).max() / mx.abs(full_flat[k]).max()).item()
    for k in full_flat
)
local_differs = max(
    mx.abs(local_flat[k] - full_flat[k]).max().item() for k in full_flat
)
print_line(json.dumps({"rank": rank, "size": size, "backend": backend, "max_rel_error": rel,
                       "local_vs_full": local_differs, "identity": averaged is local}))
