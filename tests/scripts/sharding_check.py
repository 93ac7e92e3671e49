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
from course_lib.fine_tune import (GlobalBatches, PhaseTimer, add_adapters, apply_recipe,
                                  build_parser, load_data, load_model, make_step)
from course_lib.fine_tune.options import DEFAULT_DATA
from course_lib.fine_tune.sharding import check_sharding, shard_model
from course_lib.fine_tune.step import training_loss

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
    args = build_parser().parse_args(["--model", "tiny", "--fine-tune-type", ftype,
                                      "--num-layers", "-1", "--sharding", mode])
    apply_recipe(args)
    check_sharding(args, size if mode != "none" else 1)
    model, tokenizer, _ = load_model("tiny", lazy=True, seed=7)  # seeded after any build
    rows, _ = load_data(DEFAULT_DATA, tokenizer, args)
    add_adapters(model, args)
    for name, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    return args, model, rows


for ftype in ("lora", "full"):
    for mode in modes:
        # The 1-rank reference: the whole batch, token-mean loss, in this process.
        args, ref, rows = build(ftype, "none")
        batch = GlobalBatches(rows, args.batch_size, args.seed).next(0, 1, 512, 1)
        (_, _), ref_grads = nn.value_and_grad(ref, training_loss(args, ref)[1])(ref, *batch)
        ref_grads = dict(tree_flatten(ref_grads))

        args, model, rows = build(ftype, mode)
        plan = shard_model(model, args, group)
        recorder = Recorder()
        step = make_step(model, recorder, args, group, PhaseTimer(False),
                         training_loss(args, model)[1], plan)
        share = plan.data_share()
        step([GlobalBatches(rows, args.batch_size, args.seed).next(*share, 512, 1)])
        grads = {k: plan.gather(k, g) for k, g in tree_flatten(recorder.grads)}
        mx.eval(grads)
        assert grads.keys() == ref_grads.keys(), (grads.keys() ^ ref_grads.keys())
        rel = max((mx.abs(grads[k] - ref_grads[k]).max() /
                   mx.maximum(mx.abs(ref_grads[k]).max(), 1e-30)).item() for k in grads)
        zero = [k for k, g in ref_grads.items() if mx.abs(g).max().item() == 0]
        held = {r["path"]: {"shape": r["shape"], "whole": r["whole"], "axis": r["axis"],
                            "trainable": r["trainable"]} for r in plan.holdings(model)}
        out.write(json.dumps({"case": f"{mode}/{ftype}", "rank": rank, "size": size,
                              "backend": backend, "max_rel_grad_error": rel,
                              "zero_gradients": zero, "held": held,
                              "reduce_scatter": plan.reduce_scatter}) + "\n")
out.close()
