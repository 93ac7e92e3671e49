"""Time the fine-tune's gradient averaging alone, without the forward and backward passes.

Run it as ranks (``mpirun -np 2`` or ``mlx.launch``; the two-host lab's
``benchmarks/lab_link_shapes.py`` does). Every rank builds the LoRA gradient tree of the
course's default model (same shapes as ``course_lib.fine_tune`` trains, zeros), then times
``all_reduce_grads`` (``--all-reduce plain``: one all-reduce per array) and
``mlx.nn.average_gradients`` (``bucketed``: arrays concatenated, one all-reduce) after a
barrier, so that no rank waits for another's computation. Rank 0 prints one JSON line:
``{"arrays", "bytes", "plain_seconds", "bucketed_seconds", "world_size", "backend"}``
(medians over ``--repeats``).

    python benchmarks/lab_grad_allreduce.py [--lora-rank 8] [--repeats 20]
"""

from __future__ import annotations

if __name__ == "__main__":  # before MLX loads: see course_lib.blas
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from course_lib import distributed as dist
from course_lib.fine_tune import add_adapters, load_model, parse


def gradient_tree(lora_rank: int):
    """Zeros shaped like the trainable (LoRA) parameters of the default model."""
    plan = parse(["--model", "tiny", "--lora-rank", str(lora_rank)])
    model, _, _ = load_model(plan.model)
    add_adapters(model, plan)
    return tree_map(mx.zeros_like, model.trainable_parameters())


def median_seconds(fn, grads, group, repeats: int) -> float:
    mx.eval(fn(grads))  # warm-up: connections, buffers
    times = []
    for _ in range(repeats):
        dist.barrier(group)
        tic = time.perf_counter()
        mx.eval(fn(grads))
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    group, backend = dist.init_world("auto")
    grads = gradient_tree(args.lora_rank)
    leaves = [v for _, v in tree_flatten(grads)]
    mx.eval(leaves)
    plain = median_seconds(lambda g: dist.all_reduce_grads(g, group), grads, group, args.repeats)
    bucketed = median_seconds(lambda g: nn.average_gradients(g, group=group), grads, group,
                              args.repeats)
    if group.rank() == 0:
        dist.print_line(json.dumps({
            "arrays": len(leaves), "bytes": sum(v.nbytes for v in leaves),
            "lora_rank": args.lora_rank, "plain_seconds": plain,
            "bucketed_seconds": bucketed, "world_size": group.size(), "backend": backend}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
