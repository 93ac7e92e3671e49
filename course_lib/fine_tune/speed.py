"""What the step has only for speed, or to measure it: pieces of a batch on concurrent MLX
streams (``--streams``), MLX's evaluation order for them, the compiled forward+backward
pass and update (``--compile``), and the phase timer (``--step-timing``, ``--rank-timing``).
Take them away and :mod:`course_lib.fine_tune.step` computes the same numbers."""

from __future__ import annotations

import math
import os
import time

import mlx.core as mx
import numpy as np

from course_lib import blas


class PhaseTimer:
    """Seconds per phase of a step, summed over a report window, and the steps in it.

    ``lap(name, *arrays)`` evaluates ``arrays`` (forcing MLX's lazy graph up to that point)
    and charges the time since the previous lap to ``name``. Disabled, it does nothing, so
    the step stays one lazy graph evaluated once.

    ``barrier`` (``--step-timing``) adds the "wait" phase: a barrier before the all-reduce,
    so that waiting for a slower rank is not charged to the communication. Without it
    (``--rank-timing``, the default) the "all_reduce" phase is this rank's time *at* the
    all-reduce: waiting for the slowest rank plus the exchange, which is what tells the
    ranks apart on the dashboard (benchmarks/rank_metrics.py measures what each costs).
    """

    # "wait": the barrier's time; zero at 1 rank and without ``barrier``.
    PHASES = ("data", "forward_backward", "wait", "all_reduce", "optimizer")

    def __init__(self, enabled: bool, barrier: bool = False):
        self.enabled, self.barrier = enabled, enabled and barrier
        self.reset()

    def reset(self):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0
        self._last = time.perf_counter()

    def start(self):
        self.steps += 1
        self._last = time.perf_counter()

    def lap(self, name: str, *arrays):
        if not self.enabled:
            return
        mx.eval(*arrays)
        now = time.perf_counter()
        self.seconds[name] += now - self._last
        self._last = now


def order_for_streams(plan) -> None:
    """Set ``MLX_BFS_MAX_WIDTH`` to 1000 (unless set) when ``plan`` may run more than one
    stream (its ``wide_evaluation_order``: ``--streams`` not 1, LoRA, no sharding, not
    compiled); call it before this process's first evaluation.

    MLX orders each evaluation's operations breadth-first up to this width (default 20),
    then depth-first, and the evaluating thread hands out only ~100 operations ahead of
    the streams. The step's gradient tree is wider than 20, so with two streams one
    piece's operations were all handed out before the other's and the streams took turns,
    slower than one stream; with 1000 they run at once (``benchmarks/README.md``). MLX
    reads the variable once, at its first evaluation. Only then: the order changes no
    result, but it changes which arrays are alive together, and a full fine-tune's peak
    memory (chapter 6, ``course_lib.memory``) is measured with MLX's own order."""
    if plan.wide_evaluation_order:
        os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1000")


class StreamSplit:
    """Computes a function of a batch as ``parts`` pieces, each on its own MLX stream.

    Rows ``i, i + parts, i + 2 parts, ...`` go to stream ``i`` (the way ranks take their
    share of a global batch, so each piece gets rows of every length), each piece cut to
    the padding its own longest row needs (the rule of
    :func:`course_lib.fine_tune.batches.pad_batch` with ``multiple``). The operations
    are only recorded here; MLX runs the streams concurrently when the results are
    evaluated. With ``parts`` > 1 each OpenBLAS call gets its share of the threads
    (:func:`course_lib.blas.set_blas_threads`), so that the streams' matmuls do not
    fight over the cores.
    """

    def __init__(self, parts: int, multiple: int = 1):
        self.parts, self.multiple = parts, multiple
        self.streams = [mx.new_stream(mx.default_device()) for _ in range(parts)] \
            if parts > 1 else [None]
        if parts > 1:
            threads = blas.blas_threads()
            if threads:
                blas.set_blas_threads(max(1, threads // parts))

    def pieces(self, batch, lengths):
        """``[(tokens, lengths), ...]``: the ``parts`` pieces of ``batch`` ``(B, L)`` and
        ``lengths`` ``(B, 2)``; the batch itself when ``parts`` is 1."""
        if self.parts == 1:
            return [(batch, lengths)]
        ends = np.array(lengths)[:, 1]
        out = []
        for i in range(min(self.parts, len(ends))):  # a batch of fewer rows: fewer pieces
            longest = int(ends[i::self.parts].max())
            width = min(batch.shape[1], 1 + self.multiple * math.ceil(longest / self.multiple))
            out.append((batch[i::self.parts, :width], lengths[i::self.parts]))
        return out

    def map(self, fn, batch, lengths) -> list:
        """``[fn(tokens, lengths) for each piece]``, each recorded on its piece's stream."""
        results = []
        for stream, (tokens, piece_lengths) in zip(self.streams, self.pieces(batch, lengths)):
            if stream is None:
                results.append(fn(tokens, piece_lengths))
            else:
                with mx.stream(stream):
                    results.append(fn(tokens, piece_lengths))
        return results


def compile_step(token_sums, update, model, optimizer):
    """``(token_sums, update)`` each ``mx.compile``d (as ``mlx_lm``'s trainer compiles its
    step): MLX fuses their many small element-wise operations into fewer kernels, traced
    once per batch shape. Parameters, optimizer moments and the dropout RNG are inputs and
    outputs of the compiled graphs rather than constants baked into them; the model is an
    output of ``token_sums`` too, as ``value_and_grad`` puts its traced parameters into it.
    The all-reduce between the two stays plain Python."""
    token_sums = mx.compile(token_sums, inputs=[model.state, mx.random.state],
                            outputs=[model.state, mx.random.state])
    update = mx.compile(update, inputs=[model.state, optimizer.state],
                        outputs=[model.state, optimizer.state])
    return token_sums, update
