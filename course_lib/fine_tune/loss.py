"""The loss the step differentiates, in two forms that give the same number.

- ``all``: ``mlx_lm``'s ``default_loss``: logits for every position of the batch, then the
  cross-entropy where a target token is scored (after the prompt with ``--mask-prompt``,
  never in the padding). The form chapter 4 reads.
- ``scored`` (the default): the same loss with the output layer applied only at the scored
  positions. The output layer is the largest matrix of a small model (SmolLM2: 49,152 x 576,
  28M of its 134M parameters, tied to the embedding), and its float32 logits the largest
  tensor of the step (8 rows x 129 positions x 49,152 = 203 MB); with ``--mask-prompt``
  about half the positions are prompt and never scored. Measured in
  ``benchmarks/real_model.py``; the losses agree with ``all`` to float rounding
  (``tests/test_fine_tune.py``). Its cross-entropy is :func:`cross_entropy`, which
  computes each exponential once and through ``mx.power`` (measured faster on a CPU).

Both return ``(mean token loss, number of scored tokens)``, as ``default_loss`` does.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

LOSSES = ("scored", "all")

_LOG2_E = 1 / math.log(2)


def scored_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """``(B, width)`` bool: where the target ``batch[:, 1:]`` is scored, ``default_loss``'s
    rule: position ``i`` (1-based) with ``offset <= i <= length`` for each row's
    ``(offset, length)`` in ``lengths`` ``(B, 2)``."""
    steps = np.arange(1, width + 1)
    return (steps >= lengths[:, :1]) & (steps <= lengths[:, 1:])


def scores_any(batch, lengths) -> bool:
    """Whether any target of ``batch`` ``(B, L)`` is scored under ``lengths`` ``(B, 2)``
    (:func:`scored_mask`; read on the host, where both are inputs). A piece that scores
    none has no mean loss: mlx_lm's ``default_loss`` divides by its zero count (NaN, in
    the gradients too), so the step and validation leave such pieces out."""
    return bool(scored_mask(np.array(lengths), batch.shape[1] - 1).any())


def output_layer(model):
    """The module or function that maps ``model.model``'s hidden states to logits (the
    tied embedding's ``as_linear`` or ``lm_head``), or None when the model's logits are
    something else: a model of another shape, or one whose ``__call__`` does more after
    the output layer (mlx_lm's granite divides by ``logits_scaling``, minicpm scales too).
    Checked numerically, once, on four tokens in evaluation mode."""
    trunk = getattr(model, "model", None)
    if trunk is None or not callable(trunk):
        return None
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        head = trunk.embed_tokens.as_linear
    else:
        head = getattr(model, "lm_head", None)
    if head is None:
        return None
    training = model.training
    model.eval()
    x = mx.array([[1, 2, 3, 4]])
    same = mx.allclose(head(trunk(x)), model(x), rtol=1e-4, atol=1e-4).item()
    model.train(training)
    return head if same else None


def cross_entropy(logits, targets):
    """Per-row cross-entropy ``logsumexp(logits) - logits[target]`` in nats: ``logits``
    ``(N, V)`` floating, ``targets`` ``(N,)`` integer class indices; returns ``(N,)``
    float32. On a GPU, ``mlx.nn.losses.cross_entropy`` (a fused kernel). On a CPU, the
    same value and gradient to float rounding (``tests/test_fine_tune.py``) in less time,
    for two reasons (``benchmarks/cross_entropy.py`` measures both on SmolLM2's 49,152
    logits per row):

    - One exponential per logit, not two. ``mx.logsumexp`` keeps only its result, so its
      backward computes ``exp(logits - lse)`` again; here the exponentials of the forward
      are kept, and the gradient through them is their value times the incoming one
      (times ``ln 2``: the derivative of ``2**y``), so backward computes none.
    - Each exponential as ``2**(y * log2(e))`` through ``mx.power``. The ``mlx-cpu`` wheel's
      ``mx.exp`` evaluates its polynomial one float at a time, with a C library call per
      multiply-add (``perf`` shows ``__fmaf_fma3`` under ``simd::exp<float, 1>``);
      ``mx.power`` calls the C library's ``powf``, which is faster.

    The row's maximum is subtracted first (as ``mlx.nn.losses.cross_entropy`` does), so
    every power is at most 1 and large logits do not overflow. On a CPU, half-precision
    logits are computed in float32 (mlx's loss would reduce in their dtype there); on a GPU
    the result is mlx's, which accumulates in float32 and returns the logits' dtype, cast
    to float32. Targets outside ``[0, V)`` are not checked (``take_along_axis`` does not).
    """
    if mx.default_device() == mx.gpu:
        return nn.losses.cross_entropy(logits, targets).astype(mx.float32)
    logits = logits.astype(mx.float32)
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = mx.power(mx.array(2.0), (logits - top) * _LOG2_E)
    lse = mx.log(e.sum(axis=-1)) + top.squeeze(-1)
    score = mx.take_along_axis(logits, targets[:, None], axis=-1).squeeze(-1)
    return lse - score


def _head(model):
    """The output layer, without the check (``loss_function`` made it once)."""
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear
    return model.lm_head


def scored_loss(model, batch, lengths):
    """``default_loss(model, batch, lengths)`` with logits only at the scored positions.

    ``batch`` ``(B, L)`` int32 tokens, ``lengths`` ``(B, 2)`` ``[offset, length]`` (as
    :func:`course_lib.fine_tune.batches.pad_batch` makes them). The positions come from
    ``lengths`` on the host (it is an input, so reading it costs nothing), the hidden
    states at them are gathered, and only those go through the output layer. Returns
    ``(loss, ntoks)``: float32 mean cross-entropy (nats per token), int32 count.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden = model.model(inputs)
    rows, width, dim = hidden.shape
    where = mx.array(np.flatnonzero(scored_mask(np.array(lengths), width)).astype(np.uint32))
    logits = _head(model)(hidden.reshape(rows * width, dim)[where])
    ce = cross_entropy(logits, targets.reshape(-1)[where])
    ntoks = mx.array(where.size, dtype=mx.int32)
    # A rank whose rows score no token (a prompt cut by --max-seq-length) returns 0, not
    # NaN: the step multiplies by ntoks again before the all-reduce.
    return ce.astype(mx.float32).sum() / mx.maximum(ntoks, 1), ntoks


def loss_function(choice: str, model):
    """``(name, loss)`` for ``--loss`` ``choice``: ``("scored", scored_loss)``, or
    ``("all", default_loss)`` for ``all`` and for a model whose output layer
    :func:`output_layer` cannot confirm. Raises ``ValueError`` for another choice."""
    from mlx_lm.tuner.trainer import default_loss

    if choice not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {choice!r}")
    if choice == "scored" and output_layer(model) is not None:
        return "scored", scored_loss
    return "all", default_loss
