"""Chapter 5's exercises: gradient accumulation on 2 ranks equals the whole batch on one,
Amdahl's predicted speed-up from a step's serial and parallel seconds, and the ring
all-reduce's cost model (``course_lib.traffic.ring_all_reduce_seconds``)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from course_lib.exercises.core import Exercise

# 1. Gradient accumulation on 2 ranks -------------------------------------------------------

MICRO_TOKENS = ((3, 6), (5, 2))   # rank 0's two micro-batches hold 3 and 6 tokens, rank 1's 5 and 2
FEATURES = 4


def micro_batch(rank, i):
    """Micro-batch ``i`` of ``rank``: (X, y), one row per target token."""
    rng = np.random.default_rng(50 + 10 * rank + i)
    t = MICRO_TOKENS[rank][i]
    X = rng.normal(size=(t, FEATURES)).astype(np.float32)
    y = (rng.random(t) > 0.5).astype(np.float32)
    return mx.array(X), mx.array(y)


def token_weights():
    return mx.array(np.linspace(-0.5, 0.7, FEATURES).astype(np.float32))


def token_loss_sum(w, X, y):
    """The summed binary cross-entropy of the tokens (X, y) at weights w."""
    z = X @ w
    return mx.sum(mx.logaddexp(0.0, z) - y * z)


def grad_sum_fn(batch):
    """(gradient summed over the micro-batch's tokens, its token count as int32)."""
    X, y = batch
    return mx.grad(token_loss_sum)(token_weights(), X, y), mx.array(X.shape[0], dtype=mx.int32)


def accumulate_args(rank, size, group):
    return [micro_batch(rank, i) for i in range(len(MICRO_TOKENS[rank]))], grad_sum_fn, group


def full_batch_gradient():
    """The mean gradient of every token of every rank's micro-batches, on one process."""
    batches = [micro_batch(r, i) for r in range(2) for i in range(len(MICRO_TOKENS[r]))]
    X = mx.concatenate([b[0] for b in batches])
    y = mx.concatenate([b[1] for b in batches])
    return mx.grad(lambda w: token_loss_sum(w, X, y) / X.shape[0])(token_weights())


def my_accumulate(micro_batches, grad_sum_fn, group):
    """This rank's share of a global batch, in micro-batches, accumulated, then averaged over
    the ranks.

    micro_batches: a list of this rank's micro-batches (pass each to grad_sum_fn as it is).
    grad_sum_fn(micro_batch) returns (grad_sum, ntoks): grad_sum (d,) float32, the SUM over
    the micro-batch's target tokens of each token's loss gradient; ntoks its number of
    tokens, an int32 scalar array (the micro-batches' counts differ). Return the mean
    gradient over every token of every micro-batch of every rank, shape (d,), the same on
    every rank. Use mx.distributed.all_sum(x, group=group)."""
    raise NotImplementedError("your code here")


def accumulate_solution(micro_batches, grad_sum_fn, group):
    grad_sum, ntoks = 0.0, 0
    for batch in micro_batches:     # accumulate: add the token sums and the token counts
        g, n = grad_sum_fn(batch)
        grad_sum, ntoks = grad_sum + g, ntoks + n
    tokens = mx.distributed.all_sum(mx.array(ntoks).astype(mx.float32), group=group)
    return mx.distributed.all_sum(grad_sum, group=group) / tokens


def accumulate_micro_means(micro_batches, grad_sum_fn, group):
    means = 0.0
    for batch in micro_batches:
        g, n = grad_sum_fn(batch)
        means = means + g / n
    return mx.distributed.all_sum(means, group=group) / (len(micro_batches) * group.size())


def accumulate_last_only(micro_batches, grad_sum_fn, group):
    for batch in micro_batches:
        g, n = grad_sum_fn(batch)
    tokens = mx.distributed.all_sum(n.astype(mx.float32), group=group)
    return mx.distributed.all_sum(g, group=group) / tokens


def accumulate_summed(micro_batches, grad_sum_fn, group):
    grad_sum = 0.0
    for batch in micro_batches:
        grad_sum = grad_sum + grad_sum_fn(batch)[0]
    return mx.distributed.all_sum(grad_sum, group=group)


def accumulate_rank_means(micro_batches, grad_sum_fn, group):
    grad_sum, ntoks = 0.0, 0
    for batch in micro_batches:
        g, n = grad_sum_fn(batch)
        grad_sum, ntoks = grad_sum + g, ntoks + n
    return mx.distributed.all_sum(grad_sum / ntoks, group=group) / group.size()


def accumulate_local(micro_batches, grad_sum_fn, group):
    grad_sum, ntoks = 0.0, 0
    for batch in micro_batches:
        g, n = grad_sum_fn(batch)
        grad_sum, ntoks = grad_sum + g, ntoks + n
    return grad_sum / ntoks


def accumulate_explain(got, want, args, rel):
    full = np.array(full_batch_gradient())
    off = float(np.abs(got - full).max() / np.abs(full).max())
    tokens = [t for ranks in MICRO_TOKENS for t in ranks]
    return (f"2 ranks x 2 accumulated micro-batches ({', '.join(map(str, tokens))} tokens) "
            f"give the gradient of the whole batch of {sum(tokens)} tokens on one process "
            f"(mx.grad of its mean loss; largest relative difference {off:.1g})")


accumulate = Exercise(
    name="ch5.accumulate", title="Gradient accumulation on 2 ranks equals the whole batch",
    ranks=2,
    make_args=accumulate_args, reference=accumulate_solution, stub=my_accumulate,
    explain=accumulate_explain,
    hint_text=("accumulation and ranks do the same thing: add token sums. Add every "
               "micro-batch's grad_sum and ntoks on this rank, all_sum both over the ranks "
               "(the count as float32), then divide once."),
    mistakes=[
        (accumulate_micro_means, "you averaged the micro-batches' means: their token counts "
                                 "differ (3, 6, 5 and 2), so add the token sums and the token "
                                 "counts, and divide once"),
        (accumulate_last_only, "you kept only the last micro-batch: add every micro-batch's "
                               "grad_sum and ntoks (accumulate), don't overwrite them"),
        (accumulate_summed, "your gradient is the sum over all 16 tokens, 16x too large: "
                            "divide by the token count, all_sum'd over the ranks"),
        (accumulate_rank_means, "you accumulated right, then averaged the ranks' means: rank 0 "
                                "has 9 tokens and rank 1 has 7, so all_sum the sums and the "
                                "counts, then divide"),
        (accumulate_local, "you returned this rank's own accumulated mean: all_sum the sums "
                           "and the counts over the ranks"),
    ])


# 2. Amdahl's law from a step's anatomy -----------------------------------------------------


def amdahl_args(rank, size, group):
    return 0.5, 3.5, 4   # seconds of a 1-rank step that stay, seconds that split; 4 ranks


def my_amdahl(serial_s, parallel_s, n):
    """Amdahl's predicted speed-up on n ranks of a 1-rank step that spends serial_s seconds
    in work every rank repeats (the optimizer, the data) and parallel_s seconds in work
    that splits over the ranks (forward+backward). All three are Python numbers; return a
    float: the 1-rank step's time over the n-rank step's time."""
    raise NotImplementedError("your code here")


def amdahl_solution(serial_s, parallel_s, n):
    return (serial_s + parallel_s) / (serial_s + parallel_s / n)


def amdahl_all_split(serial_s, parallel_s, n):
    return (serial_s + parallel_s) / ((serial_s + parallel_s) / n)


def amdahl_no_serial(serial_s, parallel_s, n):
    return (serial_s + parallel_s) / (parallel_s / n)


def amdahl_n_minus_1(serial_s, parallel_s, n):
    return (serial_s + parallel_s) / (serial_s + parallel_s / (n - 1))


def amdahl_seconds_as_fraction(serial_s, parallel_s, n):
    return 1 / (serial_s + (1 - serial_s) / n)


def amdahl_inverted(serial_s, parallel_s, n):
    return (serial_s + parallel_s / n) / (serial_s + parallel_s)


def amdahl_explain(got, want, args, rel):
    serial_s, parallel_s, n = args
    s = serial_s / (serial_s + parallel_s)
    return (f"{want:.2f}x on {n} ranks: the step goes from {serial_s + parallel_s:g} s to "
            f"{serial_s + parallel_s / n:.3g} s; with a serial fraction s = {s:.3f} no number "
            f"of ranks gets past 1/s = {1 / s:.0f}x")


amdahl = Exercise(
    name="ch5.amdahl", title="Amdahl's predicted speed-up from a step's anatomy", ranks=1,
    make_args=amdahl_args, reference=amdahl_solution, stub=my_amdahl,
    explain=amdahl_explain, rtol=1e-5,
    hint_text=("on n ranks the parallel seconds shrink to parallel_s / n and the serial "
               "seconds stay as they are; the speed-up is the old step time over the new."),
    mistakes=[
        (amdahl_all_split, "your speed-up is exactly n: you divided the serial part by n too; "
                           "every rank repeats it in full"),
        (amdahl_no_serial, "you left the serial seconds out of the n-rank step: they stay in "
                           "it, serial_s + parallel_s / n"),
        (amdahl_n_minus_1, "you divided the parallel part by n - 1: n ranks split it n ways"),
        (amdahl_seconds_as_fraction, "you used serial_s, a time in seconds, as Amdahl's "
                                     "fraction s: s = serial_s / (serial_s + parallel_s), or "
                                     "work with the seconds directly"),
        (amdahl_inverted, "your answer is below 1, upside down: the speed-up is the 1-rank "
                          "time over the n-rank time"),
    ])


# 3. The ring all-reduce's cost model -------------------------------------------------------


def ring_args(rank, size, group):
    # Chapter 4's LoRA gradient in float32 (651,264 parameters x 4 bytes) over 4 machines on
    # course_lib.lab.SHAPES["wifi"]: 400 Mbit/s, 1.5 ms one-way latency.
    return 651_264 * 4, 4, 400e6, 1.5e-3


def my_ring_seconds(nbytes, n, bits_per_second, latency_seconds):
    """Seconds one ring all-reduce of nbytes bytes (on every rank) takes over n machines,
    on links of bits_per_second bits per second and latency_seconds one-way latency per
    message, as the course's cost model counts it (Python numbers; return a float, 0 for
    one machine)."""
    raise NotImplementedError("your code here")


def ring_solution(nbytes, n, bits_per_second, latency_seconds):
    if n <= 1:
        return 0.0
    sent = 2 * (n - 1) / n * nbytes               # reduce-scatter, then all-gather
    return sent * 8 / bits_per_second + 2 * (n - 1) * latency_seconds


def ring_reduce_scatter_only(nbytes, n, bits_per_second, latency_seconds):
    return (n - 1) / n * nbytes * 8 / bits_per_second + (n - 1) * latency_seconds


def ring_latency_once(nbytes, n, bits_per_second, latency_seconds):
    return 2 * (n - 1) / n * nbytes * 8 / bits_per_second + latency_seconds


def ring_no_fraction(nbytes, n, bits_per_second, latency_seconds):
    return 2 * nbytes * 8 / bits_per_second + 2 * (n - 1) * latency_seconds


def ring_bytes_as_bits(nbytes, n, bits_per_second, latency_seconds):
    return 2 * (n - 1) / n * nbytes / bits_per_second + 2 * (n - 1) * latency_seconds


def ring_explain(got, want, args, rel):
    from course_lib.traffic import ring_all_reduce_seconds

    nbytes, n, bps, latency = args
    course = ring_all_reduce_seconds(nbytes, n, bps, latency)
    bandwidth = 2 * (n - 1) / n * nbytes * 8 / bps
    return (f"{1e3 * want:.1f} ms, what course_lib.traffic.ring_all_reduce_seconds says "
            f"({1e3 * course:.1f} ms): {1e3 * bandwidth:.1f} ms moving {nbytes / 1e6:.2f} MB "
            f"at {bps / 1e6:g} Mbit/s, plus 2(N-1) = {2 * (n - 1)} latencies of "
            f"{1e3 * latency:g} ms (per call: chapter 5 multiplies them by a step's calls)")


ring_cost = Exercise(
    name="ch5.ring_cost", title="The ring all-reduce's cost model", ranks=1,
    make_args=ring_args, reference=ring_solution, stub=my_ring_seconds,
    explain=ring_explain, rtol=1e-5,
    hint_text=("a ring all-reduce is a reduce-scatter then an all-gather: each passes "
               "(n-1)/n of the array through every machine in n-1 steps. Bytes become bits "
               "(x 8) before dividing by bits per second; each of the 2(n-1) steps pays the "
               "latency."),
    mistakes=[
        (ring_reduce_scatter_only, "your time is half the answer: that is the reduce-scatter "
                                   "alone; the all-gather after it sends as much again, in as "
                                   "many steps (factor 2)"),
        (ring_latency_once, "you paid the latency once: a ring all-reduce takes 2(n-1) steps, "
                            "and each pays it"),
        (ring_no_fraction, "you sent 2 x nbytes: each machine sends 2(n-1)/n of the array, "
                           "not all of it twice"),
        (ring_bytes_as_bits, "your bandwidth time is 8x too small: nbytes is in bytes and the "
                             "link in bits per second; multiply the bytes by 8"),
    ])
