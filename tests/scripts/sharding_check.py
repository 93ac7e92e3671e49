"""Run under 2 ranks: what each rank holds under --sharding fsdp / tensor, and the step's
gradient against the 1-rank gradient of the whole batch.

For each mode and fine-tune type (LoRA, full) every rank loads the tiny model with the
same seed, adds the adapters (LoRA's B matrices set non-zero, so that A has a gradient
too), shards it and runs the fine-tune's own step (``make_step``) on one global batch
with an optimizer that only records the gradient. The gradient is gathered whole and
compared with the one an unsharded copy of the model computes on the whole batch in
this process. Usage: ``sharding_check.py OUT_DIR [MODE...]``; each rank writes one JSON
line per case into ``OUT_DIR/rank{r}.jsonl`` (lines this long would interleave on
mpirun's stdout).
"""
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from course_lib.distributed import init_world
from course_lib.fine_tune import (GlobalBatches, add_adapters, load_data, load_model,
                                  make_step, parse)
from course_lib.fine_tune.loss import loss_function
from course_lib.fine_tune.options import DEFAULT_DATA
from course_lib.fine_tune.sharding import shard_model

group, backend = init_world("auto")
rank, size = group.rank(), group.size()
out = open(Path(sys.argv[1]) / f"rank{rank}.jsonl", "w")
modes = sys.argv[2:] or ["fsdp", "tensor"]


class Recorder:
    """Stands in for the optimizer: keeps the gradient it is given."""
    state: dict = {}

    def update(self, model, grads):
        self.grads = grads


def build(ftype, mode):
    plan = parse(["--model", "tiny", "--fine-tune-type", ftype, "--num-layers", "-1",
                  "--sharding", mode], size if mode != "none" else 1, backend, rank)
    model, tokenizer, _ = load_model("tiny", lazy=True, seed=7)  # seeded after any build
    rows, _ = load_data(DEFAULT_DATA, tokenizer, plan)
    add_adapters(model, plan)
    for name, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    return plan, model, rows


for ftype in ("lora", "full"):
    for mode in modes:
        # The 1-rank reference: the whole batch, token-mean loss, in this process.
        plan, ref, rows = build(ftype, "none")
        batch = GlobalBatches(rows, plan.batch_size, plan.seed).next(0, 1, 512, 1)
        loss_fn = loss_function(plan.loss, ref)[1]
        (_, _), ref_grads = nn.value_and_grad(ref, loss_fn)(ref, *batch)
        ref_grads = dict(tree_flatten(ref_grads))

        plan, model, rows = build(ftype, mode)
        sharding = shard_model(model, plan, group)
        recorder = Recorder()
        step = make_step(model, recorder, plan, sharding, loss_function(plan.loss, model)[1])
        share = sharding.data_share()
        step([GlobalBatches(rows, plan.batch_size, plan.seed).next(*share, 512, 1)])
        grads = {k: sharding.gather(k, g) for k, g in tree_flatten(recorder.grads)}
        mx.eval(grads)
        assert grads.keys() == ref_grads.keys(), (grads.keys() ^ ref_grads.keys())
        rel = max((mx.abs(grads[k] - ref_grads[k]).max() /
                   mx.maximum(mx.abs(ref_grads[k]).max(), 1e-30)).item() for k in grads)
        zero = [k for k, g in ref_grads.items() if mx.abs(g).max().item() == 0]
        held = {r["path"]: {"shape": r["shape"], "whole": r["whole"], "axis": r["axis"],
                            "trainable": r["trainable"]} for r in sharding.holdings(model)}
        out.write(json.dumps({"case": f"{mode}/{ftype}", "rank": rank, "size": size,
                              "backend": backend, "max_rel_grad_error": rel,
                              "zero_gradients": zero, "held": held,
                              "reduce_scatter": sharding.reduce_scatter}) + "\n")
out.close()
