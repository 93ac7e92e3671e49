"""One training step: gradients on this rank's share of the global batch, the all-reduce
that averages them (token-weighted), and the optimizer update; timed phase by phase when
asked."""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from course_lib import distributed as dist
from course_lib.fine_tune.loss import loss_function


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


def make_step(model, optimizer, args, group, timer: PhaseTimer, loss_fn, sharding=None):
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
    """
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
            loss, n, grads = token_sums(batch, lengths)
            grad_sum = grads if grad_sum is None else tree_map(mx.add, grad_sum, grads)
            loss_sum, ntoks = loss_sum + loss, ntoks + n
            del grads
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
            total = reduced["ntoks"]
            grads = tree_map(lambda g: g / total, reduced.pop("grads"))
            del reduced
        else:
            # mlx_lm's way: this rank's mean, then the mean of the means.
            grads = average(tree_map(lambda g: g / ntoks, grad_sum))
            del grad_sum
        # Every rank now holds the same gradient (under fsdp: its pieces of it).
        timer.lap("all_reduce", grads)
        update(grads)
        del grads
        timer.lap("optimizer", model.parameters(), optimizer.state)
        return loss_sum, ntoks

    return step
