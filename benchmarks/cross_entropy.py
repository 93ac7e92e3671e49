"""The scored loss's cross-entropy on this machine: ``mlx.nn.losses.cross_entropy`` against
``course_lib.fine_tune.loss.cross_entropy``, forward and backward through the output layer
as the fine-tune computes them, and the exponential they rest on, per float.

Shapes are the real model's: SmolLM2's tied output layer (49,152 x 576, float32) applied
to ``--rows`` hidden states (default 270, about the scored tokens one stream computes in a
step of the default recipe: global batch 8, two streams). Each form runs ``--repeats``
times after one warm-up, alternating; the table shows medians, one thread (as each stream
has), OpenBLAS preloaded as the entry points do.

    python benchmarks/cross_entropy.py [--rows 270] [--repeats 5]

Prints the tables and writes results/cross_entropy.json.
"""

import argparse
import math
import time

from common import median, save, table


def timed(fn, repeats: int) -> list[float]:
    """Seconds of ``fn()`` evaluated, ``repeats`` times after one warm-up."""
    import mlx.core as mx

    mx.eval(fn())
    seconds = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        seconds.append(time.perf_counter() - tic)
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=270)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    from course_lib import blas

    blas.reexec_with_fast_blas()
    blas.set_blas_threads(1)
    import mlx.core as mx
    import mlx.nn as nn

    from course_lib.fine_tune.loss import cross_entropy

    vocab, dim = 49_152, 576
    mx.random.seed(0)
    hidden = mx.random.normal((a.rows, dim))
    head = mx.random.normal((vocab, dim)) * 0.05
    targets = mx.random.randint(0, vocab, (a.rows,))

    def loss_of(ce):
        return mx.value_and_grad(lambda h: ce(h @ head.T, targets).sum())

    forms = {"mlx.nn.losses.cross_entropy": loss_of(nn.losses.cross_entropy),
             "course_lib cross_entropy": loss_of(cross_entropy)}
    values = {name: f(hidden) for name, f in forms.items()}
    ref_loss, ref_grad = values["mlx.nn.losses.cross_entropy"]
    ours_loss, ours_grad = values["course_lib cross_entropy"]
    loss_diff = abs(ours_loss - ref_loss).item() / abs(ref_loss).item()
    grad_diff = (mx.abs(ours_grad - ref_grad).max() / mx.abs(ref_grad).max()).item()

    seconds = {name: [] for name in forms}
    for i in range(a.repeats):
        for name in (list(forms) if i % 2 == 0 else list(forms)[::-1]):
            seconds[name] += timed(lambda: forms[name](hidden), 1)
    logits = hidden @ head.T
    mx.eval(logits)
    floats = logits.size
    two = mx.array(2.0)
    kernels = {"mx.exp(x)": lambda: mx.exp(logits),
               "mx.power(2, x * log2(e))": lambda: mx.power(two, logits * (1 / math.log(2))),
               "x * log2(e) (a plain pass)": lambda: logits * (1 / math.log(2))}
    per_float = {name: median(timed(fn, a.repeats)) / floats * 1e9
                 for name, fn in kernels.items()}

    ref_s = median(seconds["mlx.nn.losses.cross_entropy"])
    rows = [[name, 1000 * median(s), ref_s / median(s)] for name, s in seconds.items()]
    print(f"{a.rows} rows x {vocab} logits, forward + backward through the output layer "
          f"(median of {a.repeats}, 1 thread):")
    print(table(["cross-entropy", "ms", "x mlx"], rows))
    print(f"relative difference: loss {loss_diff:.1e}, gradient (max) {grad_diff:.1e}")
    print(f"\nper float, {floats / 1e6:.1f} M floats:")
    print(table(["kernel", "ns per float"], [[k, v] for k, v in per_float.items()]))
    print("saved", save("cross_entropy", {
        "rows": a.rows, "vocabulary": vocab, "hidden": dim, "repeats": a.repeats,
        "milliseconds": {k: 1000 * median(v) for k, v in seconds.items()},
        "runs_seconds": seconds, "speedup": ref_s / median(seconds["course_lib cross_entropy"]),
        "relative_difference": {"loss": loss_diff, "gradient_max": grad_diff},
        "ns_per_float": per_float}))


if __name__ == "__main__":
    main()
