"""Chapter 3's exercises: reduce-scatter, all-gather and broadcast, each built from
``all_sum`` (what MLX's MPI and ring backends have), on 2 real ranks."""

from __future__ import annotations

import mlx.core as mx

from course_lib.exercises.core import Exercise
from course_lib.traffic import ring_bytes_sent

#: Each rank's array in the checks: rank 0 holds small numbers, rank 1 ten times larger, so
#: that a sum, a mean, a chunk and a swapped order all give different answers.
SCALE = (1.0, 10.0)


def per_rank(rank, length):
    """``[1, 2, 3, ...]`` on rank 0, ``[10, 20, 30, ...]`` on rank 1 (float32)."""
    return mx.arange(1, length + 1, dtype=mx.float32) * SCALE[rank]


def wire_bytes(op, n_bytes, ranks):
    """Bytes each rank sends for ``op`` on an ``n_bytes`` array, with the ring algorithm
    (:func:`course_lib.traffic.ring_bytes_sent`), as a whole number."""
    return round(ring_bytes_sent(op, n_bytes, ranks))


# 1. Reduce-scatter from all_sum ----------------------------------------------------------


def reduce_scatter_args(rank, size, group):
    return per_rank(rank, 3 * size), group


def my_reduce_scatter(x, group):
    """This rank's chunk of the sum of x over the ranks.

    x: shape (N * k,), float32, where N = group.size(); every rank holds its own x.
    Return this rank's chunk of the element-wise sum over the ranks: elements
    k * r to k * (r + 1) of it, r = group.rank(), shape (k,).
    Build it from mx.distributed.all_sum(a, group=group)."""
    raise NotImplementedError("your code here")


def reduce_scatter_solution(x, group):
    n, r = group.size(), group.rank()
    k = x.shape[0] // n
    total = mx.distributed.all_sum(x, group=group)
    return total[k * r:k * (r + 1)]


def reduce_scatter_whole(x, group):
    return mx.distributed.all_sum(x, group=group)


def reduce_scatter_next_chunk(x, group):
    n, r = group.size(), group.rank()
    k = x.shape[0] // n
    total = mx.distributed.all_sum(x, group=group)
    r = (r + 1) % n
    return total[k * r:k * (r + 1)]


def reduce_scatter_unsummed(x, group):
    n, r = group.size(), group.rank()
    k = x.shape[0] // n
    return x[k * r:k * (r + 1)]


def reduce_scatter_mean(x, group):
    n, r = group.size(), group.rank()
    k = x.shape[0] // n
    total = mx.distributed.all_sum(x, group=group) / n
    return total[k * r:k * (r + 1)]


def reduce_scatter_chunk_of_n(x, group):
    n, r = group.size(), group.rank()
    total = mx.distributed.all_sum(x, group=group)
    return total[n * r:n * (r + 1)]


def reduce_scatter_explain(got, want, args, rel):
    x, group = args
    n, r = group.size(), group.rank()
    k = x.shape[0] // n
    return (f"rank {r} holds {want.tolist()}, elements {k * r} to {k * (r + 1) - 1} of the sum. "
            f"Built from all_sum, each rank sent {wire_bytes('all_sum', x.nbytes, n)} bytes (a "
            f"ring all-reduce of the whole {x.nbytes}-byte x); a real ring reduce-scatter sends "
            f"{wire_bytes('sum_scatter', x.nbytes, n)}, (N-1)/N of x")


reduce_scatter = Exercise(
    name="ch3.reduce_scatter", title="Reduce-scatter, built from all_sum", ranks=2,
    make_args=reduce_scatter_args, reference=reduce_scatter_solution, stub=my_reduce_scatter,
    explain=reduce_scatter_explain,
    hint_text=("all_sum the whole x (every rank then holds the full sum), then keep your "
               "slice: k = x.shape[0] // group.size(), r = group.rank(), total[k * r:k * (r + 1)]."),
    mistakes=[
        (reduce_scatter_whole, "you returned the whole sum: each rank keeps only its chunk, "
                               "elements k * rank to k * (rank + 1), k = len(x) / N"),
        (reduce_scatter_next_chunk, "you took the next rank's chunk (off by one): rank r keeps "
                                    "elements k * r to k * (r + 1), counting chunks from 0"),
        (reduce_scatter_unsummed, "you returned your own x's chunk, not summed: all_sum x over "
                                  "the ranks first, then take your chunk of the sum"),
        (reduce_scatter_mean, "your chunk is N times too small: a reduce-scatter sums, don't "
                              "divide by the world size"),
        (reduce_scatter_chunk_of_n, "your chunks have N elements: a chunk has k = len(x) / N "
                                    "elements (x.shape[0] // group.size())"),
    ])


# 2. All-gather from all_sum --------------------------------------------------------------


def all_gather_args(rank, size, group):
    return per_rank(rank, 3), group


def my_all_gather(x, group):
    """Every rank's x, side by side, on every rank.

    x: shape (k,), float32; every rank holds its own x.
    Return shape (N * k,), N = group.size(): rank r's x at [r * k:(r + 1) * k].
    Build it from mx.distributed.all_sum(a, group=group), not mx.distributed.all_gather."""
    raise NotImplementedError("your code here")


def all_gather_solution(x, group):
    n, r = group.size(), group.rank()
    # N slots of k: this rank's x in slot r, zeros in the others; the sum fills every slot.
    slots = [x if i == r else mx.zeros_like(x) for i in range(n)]
    return mx.distributed.all_sum(mx.concatenate(slots), group=group)


def all_gather_reversed(x, group):
    n, r = group.size(), group.rank()
    slots = [x if i == n - 1 - r else mx.zeros_like(x) for i in range(n)]
    return mx.distributed.all_sum(mx.concatenate(slots), group=group)


def all_gather_summed(x, group):
    return mx.distributed.all_sum(x, group=group)


def all_gather_repeated(x, group):
    return mx.concatenate([x] * group.size())


def all_gather_unflattened(x, group):
    n, r = group.size(), group.rank()
    slots = [x if i == r else mx.zeros_like(x) for i in range(n)]
    return mx.distributed.all_sum(mx.stack(slots), group=group)


def all_gather_explain(got, want, args, rel):
    x, group = args
    n = group.size()
    return (f"every rank holds {want.tolist()}, rank 0's x then rank 1's. Built from all_sum, "
            f"each rank sent {wire_bytes('all_sum', n * x.nbytes, n)} bytes (an all-reduce of "
            f"the {n * x.nbytes}-byte buffer of N slots); a real ring all-gather sends "
            f"{wire_bytes('all_gather', x.nbytes, n)}, its x to each other rank once")


all_gather = Exercise(
    name="ch3.all_gather", title="All-gather, built from all_sum", ranks=2,
    make_args=all_gather_args, reference=all_gather_solution, stub=my_all_gather,
    explain=all_gather_explain,
    hint_text=("make a buffer of N slots of k elements, your x in slot group.rank() and zeros "
               "in the others (mx.concatenate of x and mx.zeros_like(x)); all_sum the buffers: "
               "each slot holds one rank's x plus zeros."),
    mistakes=[
        (all_gather_reversed, "the ranks' x are in the wrong order: rank r's x belongs at "
                              "[r * k:(r + 1) * k], so put yours in slot group.rank()"),
        (all_gather_summed, "you summed the ranks' x into one (k,) array: an all-gather puts "
                            "them side by side; place your x in its own slot of a zero buffer "
                            "of N * k, then all_sum"),
        (all_gather_repeated, "you repeated your own x N times: the other slots must hold the "
                              "other ranks' x, which only a collective (all_sum) brings"),
        (all_gather_unflattened, "your result has shape (N, k): return one flat array of "
                                 "N * k (reshape(-1), or concatenate instead of stack)"),
    ])


# 3. Broadcast from all_sum ---------------------------------------------------------------

ROOT = 1   # not 0, so that a broadcast always from rank 0 is caught


def broadcast_args(rank, size, group):
    return per_rank(rank, 3), group, ROOT


def my_broadcast(x, group, root):
    """The root's x, on every rank.

    x: shape (k,), float32; every rank holds its own x. root: an int, the rank whose x
    every rank must return (any rank, not only 0).
    Return root's x on every rank, shape (k,). Build it from
    mx.distributed.all_sum(a, group=group)."""
    raise NotImplementedError("your code here")


def broadcast_solution(x, group, root):
    mine = group.rank() == root
    return mx.distributed.all_sum(x if mine else mx.zeros_like(x), group=group)


def broadcast_from_rank0(x, group, root):
    mine = group.rank() == 0
    return mx.distributed.all_sum(x if mine else mx.zeros_like(x), group=group)


def broadcast_not_zeroed(x, group, root):
    return mx.distributed.all_sum(x, group=group)


def broadcast_mean(x, group, root):
    return mx.distributed.all_sum(x, group=group) / group.size()


def broadcast_explain(got, want, args, rel):
    x, group, root = args
    n = group.size()
    return (f"every rank holds {want.tolist()}, rank {root}'s x. Built from all_sum, the "
            f"ranks sent {n * wire_bytes('all_sum', x.nbytes, n)} bytes in all (an all-reduce "
            f"of the "
            f"{x.nbytes}-byte x); a real broadcast sends {(n - 1) * x.nbytes}, x once to each "
            f"other rank")


broadcast = Exercise(
    name="ch3.broadcast", title="Broadcast, built from all_sum", ranks=2,
    make_args=broadcast_args, reference=broadcast_solution, stub=my_broadcast,
    explain=broadcast_explain,
    hint_text=("every rank calls all_sum; the root passes its x, every other rank passes "
               "zeros of the same shape (mx.zeros_like(x)), so the sum is the root's x. "
               "Compare group.rank() with root, not with 0."),
    mistakes=[
        # On 2 ranks, rank 0 cannot tell "from rank 0" from "kept its own x" (both are rank
        # 0's x there), and the first rank that is wrong speaks: one message names both.
        (broadcast_from_rank0, f"you returned rank 0's x, but the root is rank {ROOT} here: "
                               "did you broadcast from rank 0, or return x unchanged? The rank "
                               "whose group.rank() == root sends x, every other rank zeros"),
        (broadcast_not_zeroed, "you returned the sum of every rank's x: the ranks other than "
                               "the root must send zeros (mx.zeros_like(x)) into the all_sum"),
        (broadcast_mean, "you returned the mean of the ranks' x: a broadcast sends the root's "
                         "x unchanged; the other ranks send zeros into the all_sum, no "
                         "division"),
    ])
