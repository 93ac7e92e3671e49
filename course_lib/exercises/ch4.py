"""Chapter 4's exercises: the course's central line (token-weighted gradient averaging, on 2
ranks), a LoRA layer's forward pass in ``mlx_lm``'s layout, and LoRA's parameter count."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from course_lib.exercises.core import Exercise

# 1. Token-weighted averaging, on 2 ranks ---------------------------------------------------

TOKENS = (7, 13)   # rank 0 scores 7 target tokens, rank 1 scores 13
DIM = 5


def token_args(rank, size, group):
    rng = np.random.default_rng(40 + rank)
    per_token = rng.normal(size=(TOKENS[rank], DIM)).astype(np.float32)
    return (mx.array(per_token.sum(axis=0)), mx.array(TOKENS[rank], dtype=mx.int32), group)


def my_average_gradients(grad_sum, ntoks, group):
    """The gradient every rank applies, from this rank's token sums.

    grad_sum: (d,) float32, the SUM over this rank's target tokens of each token's loss
    gradient. ntoks: this rank's number of target tokens, an int32 scalar array (the ranks'
    counts differ). Return the mean gradient over every token of every rank, shape (d,),
    the same on every rank. Use mx.distributed.all_sum(x, group=group)."""
    raise NotImplementedError("your code here")


def token_solution(grad_sum, ntoks, group):
    tokens = mx.distributed.all_sum(ntoks.astype(mx.float32), group=group)
    return mx.distributed.all_sum(grad_sum, group=group) / tokens


def token_mean_of_means(grad_sum, ntoks, group):
    return mx.distributed.all_sum(grad_sum / ntoks, group=group) / group.size()


def token_local_count(grad_sum, ntoks, group):
    return mx.distributed.all_sum(grad_sum, group=group) / ntoks


def token_summed(grad_sum, ntoks, group):
    return mx.distributed.all_sum(grad_sum, group=group)


def token_by_ranks(grad_sum, ntoks, group):
    return mx.distributed.all_sum(grad_sum, group=group) / group.size()


def token_local_mean(grad_sum, ntoks, group):
    return grad_sum / ntoks


def token_explain(got, want, args, rel):
    sums = [np.array(token_args(r, 2, None)[0]) for r in range(2)]
    counts = [float(TOKENS[r]) for r in range(2)]
    right = (sums[0] + sums[1]) / sum(counts)
    means = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    off = float(np.abs(means - right).max() / np.abs(right).max())
    return (f"every rank holds the mean over all {TOKENS[0] + TOKENS[1]} tokens ({TOKENS[0]} "
            f"on rank 0, {TOKENS[1]} on rank 1), what one rank computes on the whole batch "
            f"(largest relative difference {rel:.1g}); the mean of the two ranks' means "
            f"(--loss-weighting ranks) would be off by up to {off:.0%} here")


token_average = Exercise(
    name="ch4.token_average", title="Token-weighted gradient averaging (the course's central "
    "line)", ranks=2,
    make_args=token_args, reference=token_solution, stub=my_average_gradients,
    explain=token_explain,
    hint_text=("the loss is a mean over target tokens: (sum of every token's gradient) / "
               "(number of tokens). grad_sum is already this rank's sum; all_sum the sums, "
               "all_sum the counts (as float32), then divide once."),
    mistakes=[
        (token_mean_of_means, "you averaged the ranks' per-token means (mlx_lm's "
                              "--loss-weighting ranks): rank 0 has 7 tokens and rank 1 has 13, "
                              "so all_sum the token sums and the token counts, then divide"),
        (token_local_count, "you divided by this rank's own token count: divide by every "
                            "rank's tokens together (all_sum ntoks too)"),
        (token_summed, "your gradient is the sum over all 20 tokens, 20x too large: divide "
                       "by the token count, all_sum'd over the ranks"),
        (token_by_ranks, "you divided the summed gradients by the number of ranks: divide by "
                         "the number of tokens (all_sum ntoks)"),
        (token_local_mean, "you returned this rank's own mean: combine the ranks' sums with "
                           "all_sum before dividing"),
    ])


# 2. A LoRA layer's forward pass, in mlx_lm's layout ----------------------------------------

LORA_SHAPE = {"rows": 3, "d": 6, "r": 2}   # d_in == d_out: a wrong layout keeps the shape


def forward_args(rank, size, group):
    rng = np.random.default_rng(4)
    n, d, r = LORA_SHAPE["rows"], LORA_SHAPE["d"], LORA_SHAPE["r"]
    x = rng.normal(size=(n, d)).astype(np.float32)
    W = rng.normal(size=(d, d)).astype(np.float32) / np.sqrt(d)
    A = rng.uniform(-d ** -0.5, d ** -0.5, size=(d, r)).astype(np.float32)
    B = (0.05 * rng.normal(size=(r, d))).astype(np.float32)   # as if trained a little
    return mx.array(x), mx.array(W), mx.array(A), mx.array(B), 20.0


def my_lora_forward(x, W, A, B, scale):
    """The output of a LoRA layer, in mlx_lm's layout (mlx_lm.tuner.lora.LoRALinear).

    x: (n, d_in) float32 inputs. W: (d_out, d_in), the frozen nn.Linear's weight.
    A: (d_in, r), LoRALinear's lora_a. B: (r, d_out), its lora_b. scale: a float
    (alpha / r; mlx_lm's default is 20.0). Return y of shape (n, d_out): the frozen layer's
    output plus the scaled low-rank update."""
    raise NotImplementedError("your code here")


def forward_solution(x, W, A, B, scale):
    return x @ W.T + scale * ((x @ A) @ B)


def forward_no_scale(x, W, A, B, scale):
    return x @ W.T + (x @ A) @ B


def forward_alpha(x, W, A, B, scale):
    return x @ W.T + scale / A.shape[1] * ((x @ A) @ B)


def forward_W_untransposed(x, W, A, B, scale):
    return x @ W + scale * ((x @ A) @ B)


def forward_B_first(x, W, A, B, scale):
    return x @ W.T + scale * ((x @ B.T) @ A.T)


def forward_twice(x, W, A, B, scale):
    fused = W + scale * (A @ B).T
    return x @ fused.T + scale * ((x @ A) @ B)


def forward_update_only(x, W, A, B, scale):
    return scale * ((x @ A) @ B)


def forward_explain(got, want, args, rel):
    from mlx_lm.tuner.lora import LoRALinear

    x, W, A, B, scale = args
    layer = LoRALinear(W.shape[1], W.shape[0], r=A.shape[1], scale=scale)
    layer.linear.weight, layer.lora_a, layer.lora_b = W, A, B
    theirs = np.array(layer(x))
    off = float(np.abs(got - theirs).max() / np.abs(theirs).max())
    return (f"your y equals mlx_lm's own LoRALinear with linear.weight = W, lora_a = A, "
            f"lora_b = B and scale = {scale:g} (largest relative difference {off:.1g})")


lora_forward = Exercise(
    name="ch4.lora_forward", title="A LoRA layer's forward pass, as mlx_lm computes it",
    ranks=1,
    make_args=forward_args, reference=forward_solution, stub=my_lora_forward,
    explain=forward_explain,
    hint_text=("nn.Linear computes x @ W.T (W is stored d_out x d_in). mlx_lm stores A as "
               "(d_in, r) and B as (r, d_out), so the update needs no transposes: x goes "
               "through A (d_in -> r), then B (r -> d_out), times scale. Add it once."),
    mistakes=[
        (forward_no_scale, "you left out scale: multiply the low-rank update (x @ A) @ B by "
                           "scale"),
        (forward_alpha, "your update is r times too small: mlx_lm's scale is already "
                        "alpha / r; multiply by scale itself"),
        (forward_W_untransposed, "the frozen part is x @ W.T, not x @ W: nn.Linear stores W "
                                 "as (d_out, d_in)"),
        (forward_B_first, "you applied B before A: x goes through A first (d_in -> r), then "
                          "B (r -> d_out): (x @ A) @ B"),
        (forward_twice, "you added the update twice (fused into W and again as the branch): "
                        "add scale * (x @ A) @ B to x @ W.T once"),
        (forward_update_only, "you returned only the low-rank update: add the frozen layer's "
                              "output x @ W.T"),
    ])


# 3. LoRA's parameter count ---------------------------------------------------------------


def count_args(rank, size, group):
    return 576, 1536, 8, 8   # SmolLM2's gate_proj (576 -> 1536), rank 8, 8 layers


def my_lora_parameters(d_in, d_out, r, layers):
    """The number of parameters LoRA of rank r trains on ``layers`` linear layers, each
    with d_in inputs and d_out outputs (all Python ints). Return an int."""
    raise NotImplementedError("your code here")


def count_solution(d_in, d_out, r, layers):
    return layers * r * (d_in + d_out)


def count_with_W(d_in, d_out, r, layers):
    return layers * (r * (d_in + d_out) + d_in * d_out)


def count_one_layer(d_in, d_out, r, layers):
    return r * (d_in + d_out)


def count_multiplied(d_in, d_out, r, layers):
    return layers * (d_in * r) * (r * d_out)


def count_square(d_in, d_out, r, layers):
    return layers * 2 * r * d_in


def count_full(d_in, d_out, r, layers):
    return layers * d_in * d_out


def count_explain(got, want, args, rel):
    d_in, d_out, r, layers = args
    frozen = layers * d_in * d_out
    return (f"{int(want):,} trainable parameters: r (d_in + d_out) = {r * (d_in + d_out):,} "
            f"per layer (A is {d_in} x {r}, B is {r} x {d_out}), {100 * want / frozen:.1f}% "
            f"of the {frozen:,} frozen weights of those {layers} layers")


lora_parameters = Exercise(
    name="ch4.lora_parameters", title="How many parameters LoRA trains", ranks=1,
    make_args=count_args, reference=count_solution, stub=my_lora_parameters,
    explain=count_explain, rtol=0.0, atol=0.5,
    hint_text=("each adapted layer gets two matrices: A (d_in x r) and B (r x d_out); the "
               "frozen W (d_out x d_in) is not trained. Add their sizes, then count every "
               "layer."),
    mistakes=[
        (count_with_W, "you counted the frozen W too: LoRA trains only A and B"),
        (count_one_layer, "that is one layer's count: multiply by the number of layers"),
        (count_multiplied, "you multiplied A's size by B's: the parameters of two matrices "
                           "add, d_in * r + r * d_out"),
        (count_square, "you counted B as if it had d_in outputs: B is r x d_out, and "
                       "d_out differs from d_in here"),
        (count_full, "that is a full d_in x d_out matrix per layer, a full fine-tune: LoRA "
                     "trains A (d_in x r) and B (r x d_out)"),
    ])
