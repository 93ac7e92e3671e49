"""Chapter 6's exercises: ZeRO-1's sharded optimizer step on 2 ranks, the bytes per rank
of each sharding mode, FSDP's gather of a layer's weight on 2 ranks, and a row-parallel
(tensor-parallel) linear layer on 2 ranks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from course_lib.exercises.core import Exercise
from course_lib.traffic import ring_bytes_sent

# 1. ZeRO-1: the momentum sharded, on 2 ranks -------------------------------------------

D = 8          # parameters; each of the 2 ranks holds the momentum of 4
LR, BETA = 0.1, 0.9


def zero1_args(rank, size, group):
    rng = np.random.default_rng(6)
    params = rng.normal(size=D).astype(np.float32)
    grads = rng.normal(size=D).astype(np.float32)
    momentum = rng.normal(size=D).astype(np.float32)   # the whole momentum; each rank holds a slice
    k = D // size
    return (mx.array(params), mx.array(grads), mx.array(momentum[rank * k:(rank + 1) * k]),
            LR, BETA, group)


def my_zero1_step(params, grads, m, lr, beta, group):
    """One step of SGD with momentum under ZeRO-1: the momentum is sharded, nothing else.

    params, grads: (d,) float32, whole and the same on every rank (d divides by the N ranks).
    m: this rank's shard of the momentum, (d/N,) float32, for the slice
    [rank * d/N, (rank + 1) * d/N) of the parameters. lr, beta: floats.
    Update your slice only: m_new = beta * m + g_slice, then p_slice - lr * m_new.
    Then rebuild the whole updated params on every rank: your updated slice with zeros
    elsewhere, added over the ranks with mx.distributed.all_sum(x, group=group).
    Return (new_params of shape (d,), m_new of shape (d/N,))."""
    raise NotImplementedError("your code here")


def zero1_solution(params, grads, m, lr, beta, group):
    k = params.shape[0] // group.size()
    lo = group.rank() * k                       # this rank's slice: [lo, lo + k)
    m_new = beta * m + grads[lo:lo + k]
    piece = mx.zeros_like(params)
    piece[lo:lo + k] = params[lo:lo + k] - lr * m_new
    return mx.distributed.all_sum(piece, group=group), m_new


def zero1_not_zeroed(params, grads, m, lr, beta, group):
    k = params.shape[0] // group.size()
    lo = group.rank() * k
    m_new = beta * m + grads[lo:lo + k]
    piece = mx.array(params)
    piece[lo:lo + k] = params[lo:lo + k] - lr * m_new
    return mx.distributed.all_sum(piece, group=group), m_new


def zero1_no_gather(params, grads, m, lr, beta, group):
    k = params.shape[0] // group.size()
    lo = group.rank() * k
    m_new = beta * m + grads[lo:lo + k]
    piece = mx.array(params)
    piece[lo:lo + k] = params[lo:lo + k] - lr * m_new
    return piece, m_new


def zero1_next_slice(params, grads, m, lr, beta, group):
    k = params.shape[0] // group.size()
    lo = ((group.rank() + 1) % group.size()) * k
    m_new = beta * m + grads[lo:lo + k]
    piece = mx.zeros_like(params)
    piece[lo:lo + k] = params[lo:lo + k] - lr * m_new
    return mx.distributed.all_sum(piece, group=group), m_new


def zero1_averaged(params, grads, m, lr, beta, group):
    k = params.shape[0] // group.size()
    lo = group.rank() * k
    m_new = beta * m + grads[lo:lo + k]
    piece = mx.zeros_like(params)
    piece[lo:lo + k] = params[lo:lo + k] - lr * m_new
    return mx.distributed.all_sum(piece, group=group) / group.size(), m_new


def zero1_ema(params, grads, m, lr, beta, group):
    k = params.shape[0] // group.size()
    lo = group.rank() * k
    m_new = beta * m + (1 - beta) * grads[lo:lo + k]
    piece = mx.zeros_like(params)
    piece[lo:lo + k] = params[lo:lo + k] - lr * m_new
    return mx.distributed.all_sum(piece, group=group), m_new


def zero1_explain(got, want, args, rel):
    d, k = args[0].shape[0], args[2].shape[0]
    return (f"every rank holds the whole updated parameters ({d} values) and kept the momentum "
            f"of only its own {k}: the optimizer state is sharded, the result is not "
            f"(largest relative difference {rel:.1g})")


zero1 = Exercise(
    name="ch6.zero1", title="ZeRO-1: a momentum step with the optimizer state sharded", ranks=2,
    make_args=zero1_args, reference=zero1_solution, stub=my_zero1_step,
    explain=zero1_explain,
    hint_text=("k = params.shape[0] // group.size() and lo = group.rank() * k: your slice is "
               "[lo:lo + k]. Update m and params[lo:lo + k], write the updated slice into "
               "mx.zeros_like(params) (piece[lo:lo + k] = ...), and all_sum the pieces: the "
               "slices do not overlap, so their sum is the whole vector."),
    mistakes=[
        (zero1_not_zeroed, "your parameters are about 2x too large: all_sum adds every rank's "
                           "whole vector, so put your updated slice into zeros "
                           "(mx.zeros_like(params)) and all_sum that"),
        (zero1_no_gather, "only your own slice is updated: the other rank's slice still holds "
                          "its old values; put your slice into zeros and all_sum the ranks' "
                          "pieces"),
        (zero1_next_slice, "you updated another rank's slice: rank r owns "
                           "[r * d/N, (r + 1) * d/N), the slice m belongs to "
                           "(lo = group.rank() * k)"),
        (zero1_averaged, "your parameters are half the answer: you divided by the ranks, but "
                         "the zero-padded slices do not overlap, so their all_sum is already "
                         "the whole vector"),
        (zero1_ema, "your momentum is beta * m + (1 - beta) * g, Adam's running average: this "
                    "SGD's momentum is beta * m + g"),
    ])


# 2. Bytes per rank of each mode --------------------------------------------------------

SMOLLM2_PARAMETERS = 134_515_008   # chapter 6's first cell prints it
MEMORY_RANKS = 4


def memory_args(rank, size, group):
    return SMOLLM2_PARAMETERS, MEMORY_RANKS


def my_bytes_per_rank(params, n):
    """Bytes per rank of a full fine-tune with Adam, all in float32, activations left out.

    params: the number of parameters (an int; every one is trained); n: the ranks.
    Each parameter costs 4 bytes of weight, 4 of gradient and 8 of Adam's two moments.
    Return a dict {"none": ..., "zero1": ..., "zero2": ..., "fsdp": ...}: the bytes each rank
    holds under data parallelism (nothing sharded), ZeRO-1 (Adam's moments sharded), ZeRO-2
    (the gradients too) and FSDP, ZeRO-3 (the weights too)."""
    raise NotImplementedError("your code here")


def memory_solution(params, n):
    weights, grads, adam = 4 * params, 4 * params, 8 * params
    return {"none": weights + grads + adam,
            "zero1": weights + grads + adam / n,
            "zero2": weights + (grads + adam) / n,
            "fsdp": (weights + grads + adam) / n}


def memory_zero1_grads(params, n):
    weights, grads, adam = 4 * params, 4 * params, 8 * params
    return {"none": weights + grads + adam,
            "zero1": weights + (grads + adam) / n,
            "zero2": weights + (grads + adam) / n,
            "fsdp": (weights + grads + adam) / n}


def memory_zero2_grads_whole(params, n):
    weights, grads, adam = 4 * params, 4 * params, 8 * params
    return {"none": weights + grads + adam,
            "zero1": weights + grads + adam / n,
            "zero2": weights + grads + adam / n,
            "fsdp": (weights + grads + adam) / n}


def memory_fsdp_weights_whole(params, n):
    weights, grads, adam = 4 * params, 4 * params, 8 * params
    return {"none": weights + grads + adam,
            "zero1": weights + grads + adam / n,
            "zero2": weights + (grads + adam) / n,
            "fsdp": weights + (grads + adam) / n}


def memory_adam_4_bytes(params, n):
    weights, grads, adam = 4 * params, 4 * params, 4 * params
    return {"none": weights + grads + adam,
            "zero1": weights + grads + adam / n,
            "zero2": weights + (grads + adam) / n,
            "fsdp": (weights + grads + adam) / n}


def memory_explain(got, want, args, rel):
    params, n = args
    gb = ", ".join(f"{mode} {b / 1e9:.2f} GB" for mode, b in want.items())
    return (f"{params:,} parameters at {n} ranks: {gb} per rank; each ZeRO stage shards one "
            f"more term (largest relative difference {rel:.1g})")


memory = Exercise(
    name="ch6.memory", title="Bytes per rank: data parallel, ZeRO-1, ZeRO-2, FSDP", ranks=1,
    make_args=memory_args, reference=memory_solution, stub=my_bytes_per_rank,
    explain=memory_explain,
    hint_text=("write the three terms, 4 * params (weights), 4 * params (gradients) and "
               "8 * params (Adam), and divide by n the ones each mode shards: ZeRO-1 Adam's, "
               "ZeRO-2 Adam's and the gradients, FSDP all three."),
    mistakes=[
        (memory_zero1_grads, "your zero1 shards the gradients too, which is ZeRO-2: ZeRO-1 "
                             "shards only Adam's moments; the weights and gradients stay whole"),
        (memory_zero2_grads_whole, "your zero2 leaves the gradients whole, which is ZeRO-1: "
                                   "ZeRO-2 shards the gradients as well as Adam's moments"),
        (memory_fsdp_weights_whole, "your fsdp leaves the weights whole, which is ZeRO-2: FSDP "
                                    "(ZeRO-3) shards the weights too, all 16 bytes / n"),
        (memory_adam_4_bytes, "you counted Adam as 4 bytes per parameter: it keeps two moments "
                              "(mean and variance), 8 bytes in float32"),
    ])


# 3. FSDP: gather a layer's weight just before it runs, on 2 ranks -------------------------

FSDP_ROWS, FSDP_D = 3, 4   # each rank's input rows; d_in == d_out, so a missing .T is silent


def fsdp_gather_args(rank, size, group):
    w = np.random.default_rng(60).normal(size=(FSDP_D, FSDP_D)).astype(np.float32)
    x = np.random.default_rng(61 + rank).normal(size=(FSDP_ROWS, FSDP_D)).astype(np.float32)
    k = FSDP_D // size
    return mx.array(x), mx.array(w[rank * k:(rank + 1) * k]), group


def my_fsdp_linear(x, w_shard, group):
    """A bias-free linear layer, y = x @ W.T, under FSDP: the weight is sharded by rows.

    x: this rank's input rows, (b, d_in) float32 (each rank has its own rows).
    w_shard: this rank's shard of the weight W (d_out, d_in), float32 of shape (d_out/N, d_in):
    the rows [rank * d_out/N, (rank + 1) * d_out/N) of W.
    Gather the whole W on every rank just before the layer runs: your shard in its rows of a
    zero (d_out, d_in) matrix, added over the ranks with mx.distributed.all_sum(x, group=group).
    Return x @ W.T, of shape (b, d_out)."""
    raise NotImplementedError("your code here")


def fsdp_gather_solution(x, w_shard, group):
    k, n = w_shard.shape[0], group.size()
    lo = group.rank() * k                       # this rank's rows of W: [lo, lo + k)
    padded = mx.zeros((n * k, w_shard.shape[1]), dtype=w_shard.dtype)
    padded[lo:lo + k] = w_shard
    w = mx.distributed.all_sum(padded, group=group)   # the whole W, on every rank
    return x @ w.T


def fsdp_gather_reversed(x, w_shard, group):
    k, n = w_shard.shape[0], group.size()
    lo = (n - 1 - group.rank()) * k
    padded = mx.zeros((n * k, w_shard.shape[1]), dtype=w_shard.dtype)
    padded[lo:lo + k] = w_shard
    return x @ mx.distributed.all_sum(padded, group=group).T


def fsdp_gather_tiled(x, w_shard, group):
    tiled = mx.concatenate([w_shard] * group.size(), axis=0)
    return x @ mx.distributed.all_sum(tiled, group=group).T


def fsdp_gather_no_transpose(x, w_shard, group):
    k, n = w_shard.shape[0], group.size()
    lo = group.rank() * k
    padded = mx.zeros((n * k, w_shard.shape[1]), dtype=w_shard.dtype)
    padded[lo:lo + k] = w_shard
    return x @ mx.distributed.all_sum(padded, group=group)


def fsdp_gather_averaged(x, w_shard, group):
    k, n = w_shard.shape[0], group.size()
    lo = group.rank() * k
    padded = mx.zeros((n * k, w_shard.shape[1]), dtype=w_shard.dtype)
    padded[lo:lo + k] = w_shard
    return x @ (mx.distributed.all_sum(padded, group=group) / n).T


def fsdp_gather_no_gather(x, w_shard, group):
    k, n = w_shard.shape[0], group.size()
    lo = group.rank() * k
    padded = mx.zeros((n * k, w_shard.shape[1]), dtype=w_shard.dtype)
    padded[lo:lo + k] = w_shard
    return x @ padded.T


def fsdp_gather_explain(got, want, args, rel):
    x, w_shard, group = args
    d_out, d_in = w_shard.shape[0] * group.size(), w_shard.shape[1]
    return (f"every rank gathered the whole {d_out} x {d_in} W from {group.size()} shards of "
            f"{w_shard.shape[0]} rows and ran the layer on its own {x.shape[0]} rows; between "
            f"layers it keeps only its shard (largest relative difference {rel:.1g})")


fsdp_gather = Exercise(
    name="ch6.fsdp_gather", title="FSDP: gather a layer's weight just before it runs", ranks=2,
    make_args=fsdp_gather_args, reference=fsdp_gather_solution, stub=my_fsdp_linear,
    explain=fsdp_gather_explain,
    hint_text=("k = w_shard.shape[0] and lo = group.rank() * k: your rows of W are [lo:lo + k]. "
               "Make mx.zeros((group.size() * k, w_shard.shape[1])), write your shard into "
               "its rows, all_sum it (the shards do not overlap, so the sum is W), and return "
               "x @ W.T."),
    mistakes=[
        (fsdp_gather_reversed, "your output's columns are in the wrong order: rank r's shard "
                               "holds rows [r * d_out/N, (r + 1) * d_out/N) of W, so put it "
                               "at lo = group.rank() * k"),
        (fsdp_gather_tiled, "every slot of your W holds the sum of all the shards: all_sum adds "
                            "whole matrices, so put your shard in its own rows of a zero "
                            "matrix and leave the other rows zero"),
        (fsdp_gather_no_transpose, "you computed x @ W: a linear layer stores W as "
                                   "(d_out, d_in) and computes x @ W.T (the shapes agree here "
                                   "only because d_in == d_out)"),
        (fsdp_gather_averaged, "your output is 1/N of the answer: you divided the all_sum by "
                               "the ranks, but the zero-padded shards do not overlap, so their "
                               "all_sum is already W (averaging is for gradients)"),
        (fsdp_gather_no_gather, "the output columns of the other rank's rows of W are 0: you "
                                "used your own shard alone; all_sum the zero-padded shards to "
                                "gather the whole W"),
    ])


# 4. Tensor parallelism: a row-parallel linear layer, on 2 ranks ---------------------------

TP_ROWS, TP_D = 3, 6   # the same 3 rows on every rank; W is 6 x 6, split by input features


def tensor_parallel_args(rank, size, group):
    rng = np.random.default_rng(62)
    x = rng.normal(size=(TP_ROWS, TP_D)).astype(np.float32)
    w = rng.normal(size=(TP_D, TP_D)).astype(np.float32)
    k = TP_D // size
    cols = slice(rank * k, (rank + 1) * k)
    return mx.array(x[:, cols]), mx.array(w[:, cols]), group


def my_row_parallel_linear(x_part, w_part, group):
    """A bias-free linear layer, y = x @ W.T, split by input features (Megatron-LM's
    row-parallel layer; MLX's "sharded-to-all").

    W is (d_out, d_in) and x is (b, d_in), the same x on every rank. Rank r holds
    x_part = x[:, r*k:(r+1)*k], (b, k) float32, and w_part = W[:, r*k:(r+1)*k],
    (d_out, k) float32, with k = d_in / N.
    Compute your partial product x_part @ w_part.T and add the ranks' partial products
    with mx.distributed.all_sum(x, group=group).
    Return the whole y = x @ W.T, of shape (b, d_out), on every rank."""
    raise NotImplementedError("your code here")


def tensor_parallel_solution(x_part, w_part, group):
    partial = x_part @ w_part.T                  # this rank's features' share of every output
    return mx.distributed.all_sum(partial, group=group)


def tensor_parallel_no_sum(x_part, w_part, group):
    return x_part @ w_part.T


def tensor_parallel_mean(x_part, w_part, group):
    return mx.distributed.all_sum(x_part @ w_part.T, group=group) / group.size()


def tensor_parallel_twice(x_part, w_part, group):
    partial = x_part @ w_part.T
    return mx.distributed.all_sum(partial, group=group) + partial


def tensor_parallel_explain(got, want, args, rel):
    x_part, w_part, group = args
    n, b, d_out = group.size(), x_part.shape[0], w_part.shape[0]
    d_in = w_part.shape[1] * n
    sent = ring_bytes_sent("all_sum", b * d_out * 4, n)          # the all_sum of y's parts
    gather = ring_bytes_sent("all_sum", d_out * d_in * 4, n)     # FSDP's gather from all_sum
    all_gather = ring_bytes_sent("all_gather", d_out * d_in * 4 / n, n)  # a real all-gather
    return (f"every rank holds y = x @ W.T; the all_sum carried b x d_out = {b} x {d_out} "
            f"floats, so each rank sent {sent:.0f} bytes (ring, {n} ranks), against "
            f"{gather:.0f} to gather the {d_out} x {d_in} W with all_sum as the FSDP "
            f"exercise does ({all_gather:.0f} with a real all-gather): tensor parallelism's "
            f"bytes grow with the rows, FSDP's with the weight (largest relative "
            f"difference {rel:.1g})")


tensor_parallel = Exercise(
    name="ch6.tensor_parallel", title="Tensor parallelism: a row-parallel linear layer",
    ranks=2, make_args=tensor_parallel_args, reference=tensor_parallel_solution,
    stub=my_row_parallel_linear, explain=tensor_parallel_explain,
    hint_text=("x @ W.T sums over the input features, and each rank holds k of them: "
               "x_part @ w_part.T is that rank's share of the sum, already of shape "
               "(b, d_out). all_sum the shares; nothing to divide, nothing to add after."),
    mistakes=[
        (tensor_parallel_no_sum, "you returned your own partial product: it sums over your "
                                 "k input features only; all_sum the ranks' partial products"),
        (tensor_parallel_mean, "your output is 1/N of the answer: the partial products are "
                               "parts of one sum over the input features, not copies to "
                               "average; don't divide the all_sum"),
        (tensor_parallel_twice, "your partial product is counted twice: all_sum already "
                                "includes this rank's part; return the all_sum alone"),
    ])
