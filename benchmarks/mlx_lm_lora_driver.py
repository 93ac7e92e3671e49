"""Run mlx_lm.lora's own training (mlx_lm.lora.train_model) with its defaults overridden like
the command line would, and record its reports as JSON lines (rank 0) for the benchmarks.

    [mpirun -np N] python benchmarks/mlx_lm_lora_driver.py OUT.jsonl -- --model M --data D ...

Everything after ``--`` is an ``mlx_lm.lora`` option. Rank 0 writes one JSON object per
report (mlx_lm's own numbers: train loss, tokens per second, peak memory) and a final
``{"wall_seconds": ...}`` covering model loading to the end of training.
"""

import json
import sys
import time
import types

t0 = time.perf_counter()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import lora  # noqa: E402
from mlx_lm.tuner.callbacks import TrainingCallback  # noqa: E402
from mlx_lm.tuner.datasets import load_dataset  # noqa: E402
from mlx_lm.utils import load  # noqa: E402


class Recorder(TrainingCallback):
    def __init__(self, path, rank):
        self.f = open(path, "w") if rank == 0 else None

    def _write(self, record):
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def on_train_loss_report(self, info):
        self._write({"split": "train", **info})

    def on_val_loss_report(self, info):
        self._write({"split": "valid", **info})


def main():
    out, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    args = vars(lora.build_parser().parse_args(rest))
    for k, v in lora.CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    args = types.SimpleNamespace(**args)
    args.train = True
    np.random.seed(args.seed)
    rank = mx.distributed.init().rank()
    recorder = Recorder(out, rank)
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, recorder)
    recorder._write({"wall_seconds": time.perf_counter() - t0,
                     "peak_memory_gb": mx.get_peak_memory() / 1e9})


if __name__ == "__main__":
    main()
