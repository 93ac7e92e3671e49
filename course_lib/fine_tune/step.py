"""One training step: gradients on this rank's share of the global batch, the all-reduce
that averages them (:func:`average_gradients`, token-weighted), and the optimizer update
(:func:`make_optimizer`).

What exists only for speed (streams, compilation, the phase timer) is in
:mod:`course_lib.fine_tune.speed`; the loss in :mod:`course_lib.fine_tune.loss`."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from course_lib import distributed as dist
from course_lib.fine_tune.loss import scores_any
from course_lib.fine_tune.speed import PhaseTimer, StreamSplit, compile_step


def average_gradients(grad_sum, ntoks, group, weighting: str = "tokens",
                      all_reduce: str = "plain"):
    """The gradient every rank applies, from this rank's token-summed gradients
    ``grad_sum`` (a tree of arrays) and its target-token count ``ntoks`` (int32 scalar).

    ``tokens`` (the default): the sum of every rank's token gradients over every rank's
    tokens, exactly the gradient one rank computes on the whole batch, in one all-reduce.
    ``ranks``: this rank's mean, then the mean of the ranks' means (``mlx_lm``'s way).
    ``all_reduce``: ``plain`` averages with :func:`course_lib.distributed.all_reduce_grads`
    (one ``all_sum`` per array), ``bucketed`` with ``mlx.nn.average_gradients``."""
    def average(tree):
        if all_reduce == "plain":
            return dist.all_reduce_grads(tree, group)
        return nn.average_gradients(tree, group=group)

    if weighting == "ranks":
        return average(tree_map(lambda g: g / mx.maximum(ntoks, 1), grad_sum))
    # mean(sum of gradients) / mean(token count) = (all token gradients) / (all tokens).
    reduced = average({"grads": grad_sum, "ntoks": ntoks.astype(mx.float32)})
    # A step whose rows score no token anywhere (prompts cut by --max-seq-length) has
    # zero gradients: divided by 1, not 0, they stay zero instead of NaN.
    total = mx.where(reduced["ntoks"] > 0, reduced["ntoks"], 1.0)
    return tree_map(lambda g: g / total, reduced["grads"])


def token_sums_function(model, loss_fn, summed: bool = False):
    """``f(batch, lengths) -> (loss sum, token count, token-summed gradients)`` of one
    micro-batch. ``loss_fn`` returns a mean: multiplying by the count undoes that, so
    micro-batches, streams and ranks add up. ``summed``: the token sum itself is
    differentiated (under sharding, whose collectives add the ranks' gradients inside the
    backward pass)."""
    def token_sum_loss(model, batch, lengths):
        loss, n = loss_fn(model, batch, lengths)
        return loss * n, n

    loss_and_grad = nn.value_and_grad(model, token_sum_loss if summed else loss_fn)

    def token_sums(batch, lengths):
        (loss, n), grads = loss_and_grad(model, batch, lengths)
        if summed:
            return loss, n, grads
        return loss * n, n, tree_map(lambda g: g * n, grads)
    return token_sums


def make_step(model, optimizer, plan, sharding, loss_fn, timer: PhaseTimer | None = None,
              split: StreamSplit | None = None):
    """The training step: ``step(micro_batches) -> (loss_sum, ntoks)``.

    ``micro_batches``: a list of ``(batch, lengths)`` (one per gradient-accumulation step)
    of this rank's rows; returns its summed token losses and target-token count (lazy
    ``mx.array`` scalars) after updating ``model`` with ``optimizer``. ``plan``
    (:class:`~course_lib.fine_tune.plan.Plan`) says whether to compile, how to weight and
    average; ``loss_fn(model, batch, lengths) -> (mean token loss, token count)``.

    Under ``--sharding fsdp`` or ``tensor`` (``sharding.sharded``) the gradients meet inside
    the backward pass, so the token *sum* is differentiated and
    :meth:`~course_lib.fine_tune.sharding.Sharding.finish_gradients` divides by the global
    token count instead of the all-reduce; its collectives are counted in
    ``sharding.traffic``. ``split`` computes each micro-batch as pieces on concurrent
    streams and adds them, exactly as it adds micro-batches; ``timer`` times the phases.
    """
    group, inside = sharding.group, sharding.sharded
    timer, split = timer or PhaseTimer(False), split or StreamSplit(1)
    token_sums = token_sums_function(model, loss_fn, summed=inside)

    def update(grads):
        optimizer.update(model, grads)

    if plan.compile:
        token_sums, update = compile_step(token_sums, update, model, optimizer)

    def scored_token_sums(batch, lengths):
        # None for a piece that scores no token, checked on the host, outside any compiled
        # graph. Under sharding every rank runs every backward pass (its collectives).
        if not inside and not scores_any(batch, lengths):
            return None
        return token_sums(batch, lengths)

    def step(micro_batches):
        with sharding.traffic.counting():
            # Names are dropped (del) once an array's last use is built: MLX frees a buffer
            # no Python name holds, so a timed phase does not keep a tree beside its copy.
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
            if inside:  # summed over the ranks in the backward pass already
                grads = sharding.finish_gradients(grad_sum, ntoks)
            else:
                grads = average_gradients(grad_sum, ntoks, group, plan.loss_weighting,
                                          plan.all_reduce)
            del grad_sum
            timer.lap("all_reduce", grads)  # every rank holds the same gradient now
            update(grads)
            del grads
            timer.lap("optimizer", model.parameters(), optimizer.state)
            return loss_sum, ntoks

    return step


def learning_rate_schedule(plan):
    """Adam's learning rate: ``--learning-rate``, or with ``--warmup-steps W`` a linear
    warm-up to it: step k (from 0) uses ``lr * min(k + 1, W) / W`` (Goyal et al. 2017, for
    large global batches). A function of the optimizer's step count, so it resumes
    exactly."""
    lr, warmup = plan.learning_rate, plan.warmup_steps
    if not warmup:
        return lr
    return lambda step: lr * mx.minimum(step + 1, warmup).astype(mx.float32) / warmup


def make_optimizer(plan, model) -> optim.Adam:
    """Adam with :func:`learning_rate_schedule`, its state made for ``model``'s trainable
    parameters."""
    optimizer = optim.Adam(learning_rate=learning_rate_schedule(plan))
    optimizer.init(model.trainable_parameters())
    return optimizer
