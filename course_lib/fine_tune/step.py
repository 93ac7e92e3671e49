"""One training step: gradients on this rank's share of the global batch, the all-reduce
that averages them (token-weighted), and the optimizer update; timed phase by phase when
asked."""

from __future__ import annotations

import math
import os
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from course_lib import blas
from course_lib import distributed as dist
from course_lib.fine_tune.loss import loss_function, scores_any


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


# Measured on the course's 2-core machine (benchmarks/all_reduce.py, MLX 0.32; see
# benchmarks/README.md): one small all_sum costs ~20 us under MPI, while under the ring
# backend single calls often take 10-20 ms. The tiny model's LoRA tree has 56 arrays
# (SmolLM2's recipe: 112): averaged plain it took ~1.4 ms under MPI and 38-65 ms under the
# ring; bucketed, ~1.7 ms and 5-9 ms.
def resolve_all_reduce(choice: str, group) -> str:
    """``plain`` or ``bucketed`` for ``--all-reduce`` ``choice``; ``auto`` picks plain (the
    course's all_reduce_grads) where a call is cheap (MPI, one rank) and bucketed where
    each call pays a large fixed latency (the ring backend)."""
    if choice != "auto":
        return choice
    return "bucketed" if dist.detect_backend() == "ring" and group.size() > 1 else "plain"


def resolve_compile(choice: bool | None) -> bool:
    """Whether to ``mx.compile`` the step for ``--compile``/``--no-compile`` (``choice``) or
    neither (``None``): on an Apple GPU yes (Metal kernels fuse and launch less often, which
    is why mlx_lm compiles its step); elsewhere no. Measured: on a 2-core x86 CPU the
    compiled step was no faster (0.84-0.92x at 1 rank, 0.97-1.08x at 2;
    benchmarks/step_anatomy.py); on an NVIDIA H200 each new batch shape costs seconds of
    tracing, so the course's 30-step LoRA ran at 0.06x compiled and only a 150-step run came
    out ahead (1.33x), and full fine-tuning at batch 32 ran at 0.28x (benchmarks/gpu.py,
    results/gpu.json)."""
    if choice is not None:
        return choice
    return mx.metal.is_available()


def training_loss(args, model):
    """``(name, loss function)`` for ``--loss`` (:mod:`course_lib.fine_tune.loss`). A
    compiled step uses ``all``: ``scored`` reads each batch's scored positions on the host,
    which a traced graph cannot."""
    return loss_function("all" if resolve_compile(args.compile) else args.loss, model)


def pad_multiple(args) -> int:
    """Padding rule of the batches (:func:`course_lib.fine_tune.batches.pad_batch`): 32
    when the step is compiled (few shapes to trace), else 1 (no padding beyond the longest
    row)."""
    return 32 if resolve_compile(args.compile) else 1


def resolve_streams(choice, rows: int, sharded: bool = False, compiled: bool = False,
                    full: bool = False) -> int:
    """How many MLX streams compute this rank's share at once, for ``--streams`` ``choice``
    (``"auto"`` or a number) and ``rows`` rows per micro-batch on this rank: never more
    than ``rows``, and 1 under sharding (its collectives inside the backward pass must run
    in the same order on every rank). ``auto`` is 1 on a GPU (one stream already fills
    it), for a ``compiled`` step and for a ``full`` fine-tune (each stream would hold a
    gradient as large as the model until they are added, which
    :func:`course_lib.memory.estimate` does not count); otherwise, on a CPU, the cores this
    rank has: the OpenBLAS threads it was given (:func:`course_lib.blas.blas_threads`,
    ``os.cpu_count() // ranks on this host`` unless ``OPENBLAS_NUM_THREADS`` says
    otherwise, as the lab's one-core hosts do), else ``os.cpu_count() // ranks on this
    host``.

    Why: MLX's CPU backend runs each stream's operations on that stream's own thread, and
    only the matmuls (OpenBLAS) spread over more cores; everything between them
    (normalization, activations, softmax, the element-wise parts of the backward pass)
    runs on one core. Measured on the course's 2-core machine (``benchmarks/
    real_model.py``): one stream at 1 rank leaves a core idle through them, which is why 2
    ranks of one stream each were 1.40x faster than 1 on the same 2 cores; 2 streams at 1
    rank are 1.39x faster than one, and 2 ranks then only 1.01x."""
    if sharded:
        return 1
    if choice == "auto":
        if compiled or full or mx.default_device() == mx.gpu:
            return 1
        choice = blas.blas_threads() or max(1, (os.cpu_count() or 1)
                                            // blas.ranks_on_this_host())
    return max(1, min(int(choice), rows))


def order_for_streams(args) -> None:
    """Set ``MLX_BFS_MAX_WIDTH`` to 1000 (unless set) when ``args`` may run more than one
    stream (:func:`resolve_streams`); call it before this process's first evaluation.

    MLX orders each evaluation's operations breadth-first up to this width (default 20),
    then depth-first, and the evaluating thread hands out only ~100 operations ahead of
    the streams. The step's gradient tree is wider than 20, so with two streams one
    piece's operations were all handed out before the other's and the streams took turns,
    slower than one stream; with 1000 they run at once (``benchmarks/README.md``). MLX
    reads the variable once, at its first evaluation. Only then: the order changes no
    result, but it changes which arrays are alive together, and a full fine-tune's peak
    memory (chapter 6, ``course_lib.memory``) is measured with MLX's own order."""
    if (args.streams != 1 and args.fine_tune_type != "full" and args.sharding == "none"
            and not resolve_compile(args.compile)):
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


def make_step(model, optimizer, args, group, timer: PhaseTimer, loss_fn, sharding=None,
              split: StreamSplit | None = None):
    """The training step: gradients on this rank's share, all-reduce, optimizer update.

    ``loss_fn(model, batch, lengths) -> (mean token loss, token count)`` is the loss
    (:func:`training_loss`). Returns ``step(micro_batches) -> (loss_sum, ntoks)`` where
    ``micro_batches`` is a list
    of ``(batch, lengths)`` (one per gradient-accumulation step) and the results are this
    rank's summed token losses and target-token count (lazy ``mx.array`` scalars).
    ``timer`` splits the step's time into phases when enabled.

    When :func:`resolve_compile` says so, the forward+backward pass and the optimizer
    update are each an ``mx.compile``d function (as ``mlx_lm``'s trainer compiles its
    step): MLX fuses their many small element-wise operations into fewer kernels, traced
    once per batch shape. The all-reduce between them stays plain Python, so the averaging
    the course teaches is the code that runs, and ``--step-timing`` still times each phase
    apart.

    Under ``--sharding fsdp`` or ``tensor`` (``sharding``, a
    :class:`course_lib.fine_tune.sharding.Sharding`) the gradients meet inside the
    backward pass (FSDP's reduce-scatter; tensor parallelism's all-sums), so the loss
    differentiated is the token *sum*, and :meth:`~course_lib.fine_tune.sharding.Sharding.
    finish_gradients` divides by the global token count instead of the all-reduce.
    Every step's collectives are counted in ``sharding.traffic``.

    ``split`` (a :class:`StreamSplit`, ``--streams``) computes each micro-batch's
    gradients as pieces on concurrent MLX streams and adds them up, exactly as it adds
    micro-batches: the token sums make the result the same gradient to float rounding.
    """
    split = split or StreamSplit(1)
    inside = sharding is not None and sharding.sharded
    if inside:
        mean_loss = loss_fn

        def loss_fn(model, batch, lengths):  # the token sum: ranks' gradients add up
            loss, n = mean_loss(model, batch, lengths)
            return loss * n, n
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    if resolve_all_reduce(args.all_reduce, group) == "plain":
        average = lambda g: dist.all_reduce_grads(g, group)  # noqa: E731
    else:
        average = lambda g: nn.average_gradients(g, group=group)  # noqa: E731

    def token_sums(batch, lengths):
        """This micro-batch's summed token loss, token count and token-summed gradients
        (default_loss returns means: multiplying by the count undoes that, so
        micro-batches and ranks add up)."""
        (loss, n), grads = loss_and_grad(model, batch, lengths)
        if inside:
            return loss, n, grads
        return loss * n, n, tree_map(lambda g: g * n, grads)

    def update(grads):
        optimizer.update(model, grads)

    if resolve_compile(args.compile):
        # Parameters, optimizer moments and the dropout RNG are inputs and outputs of the
        # compiled graphs rather than constants baked into them. The model is an output of
        # token_sums too: value_and_grad puts its traced parameters into the model.
        token_sums = mx.compile(token_sums, inputs=[model.state, mx.random.state],
                                outputs=[model.state, mx.random.state])
        update = mx.compile(update, inputs=[model.state, optimizer.state],
                            outputs=[model.state, optimizer.state])

    def scored_token_sums(batch, lengths):
        """``token_sums``, or None for a piece whose rows score no token (prompts cut by
        ``--max-seq-length``): checked on the host, outside any compiled graph. Under
        sharding every rank runs every backward pass (its collectives), so none is left
        out there; the scored loss returns 0 for such a piece by itself."""
        if not inside and not scores_any(batch, lengths):
            return None
        return token_sums(batch, lengths)

    def step(micro_batches):
        if sharding is None:
            return counted_step(micro_batches)
        with sharding.traffic.counting():
            return counted_step(micro_batches)

    def counted_step(micro_batches):
        # Names are dropped (del) as soon as an array's last use is built: MLX frees, or
        # reuses for the result, a buffer that no Python name holds. With the phases timed
        # (the default) each phase is evaluated apart, and a gradient tree still named
        # would stay in memory beside its all-reduced copy and the optimizer's moments.
        grad_sum, loss_sum, ntoks = None, mx.array(0.0), mx.array(0)
        for batch, lengths in micro_batches:
            for result in split.map(scored_token_sums, batch, lengths):
                if result is None:  # this piece scores no token: it adds nothing
                    continue
                loss, n, grads = result
                grad_sum = grads if grad_sum is None else tree_map(mx.add, grad_sum, grads)
                loss_sum, ntoks = loss_sum + loss, ntoks + n
                del grads, result
        if grad_sum is None:  # no piece on this rank scored a token: zeros to all-reduce
            grad_sum = tree_map(mx.zeros_like, model.trainable_parameters())
        timer.lap("forward_backward", grad_sum, loss_sum, ntoks)
        if timer.barrier and group.size() > 1 and not inside:
            dist.barrier(group)
            timer.lap("wait")
        if inside:  # summed over ranks in the backward pass already
            grads = sharding.finish_gradients(grad_sum, ntoks)
            del grad_sum
        elif args.loss_weighting == "tokens":
            # Average the token-summed gradients and the token counts in one all-reduce;
            # mean(sum of gradients) / mean(token count) = (all token gradients) / (all
            # tokens): exactly the gradient one rank would compute on the whole batch.
            reduced = average({"grads": grad_sum, "ntoks": ntoks.astype(mx.float32)})
            del grad_sum
            # A step whose rows score no token anywhere (prompts cut by --max-seq-length)
            # has zero gradients: divided by 1, not 0, they stay zero instead of NaN.
            total = mx.where(reduced["ntoks"] > 0, reduced["ntoks"], 1.0)
            grads = tree_map(lambda g: g / total, reduced.pop("grads"))
            del reduced
        else:
            # mlx_lm's way: this rank's mean, then the mean of the means.
            grads = average(tree_map(lambda g: g / mx.maximum(ntoks, 1), grad_sum))
            del grad_sum
        # Every rank now holds the same gradient (under fsdp: its pieces of it).
        timer.lap("all_reduce", grads)
        update(grads)
        del grads
        timer.lap("optimizer", model.parameters(), optimizer.state)
        return loss_sum, ntoks

    return step
