"""All-reduce between 2 ranks: time and bandwidth over payload sizes for the MPI and ring
backends, and the plain per-array all_reduce_grads against the bucketed form
(mlx.nn.average_gradients) on the real LoRA gradient tree of the default model.

    python benchmarks/all_reduce.py [--sizes 4KiB,...,256MiB] [--repeats 10]

Writes results/all_reduce.json and results/all_reduce.png (bandwidth against payload).
"""

import argparse
import json
import sys
import time

from common import PY, REPO, launch, run, save, table

SIZES = "4KiB,16KiB,64KiB,256KiB,1MiB,4MiB,16MiB,64MiB,256MiB"


def tree_worker(repeats: int) -> None:
    """Under 2 ranks: LoRA gradients of the default model, averaged both ways."""
    sys.path.insert(0, str(REPO))
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from course_lib.distributed import all_reduce_grads, init_world, print_line
    from course_lib.tiny_model import ensure_tiny_model

    group, backend = init_world("auto")
    model, _ = load(str(ensure_tiny_model()))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
    batch = mx.random.randint(0, 2000, (4, 97))
    lengths = mx.array([[0, 97]] * 4)
    _, grads = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    mx.eval(grads)
    leaves = tree_flatten(grads)
    out = {"backend": backend, "arrays": len(leaves),
           "bytes": sum(v.nbytes for _, v in leaves)}
    for name, fn in [("plain", lambda g: all_reduce_grads(g, group)),
                     ("bucketed", lambda g: nn.average_gradients(g, group=group))]:
        mx.eval(fn(grads))
        times = []
        for _ in range(repeats):
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
            tic = time.perf_counter()
            mx.eval(fn(grads))
            times.append(time.perf_counter() - tic)
        out[f"{name}_seconds"] = sorted(times)[len(times) // 2]
    if group.rank() == 0:
        print_line(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=SIZES)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tree-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.tree_worker:
        return tree_worker(a.repeats)
    sweep, trees = {}, {}
    for launcher, backend in [("mpirun", "mpi"), ("mlx.launch", "ring")]:
        cmd = [PY, "-m", "course_lib.distributed", "bandwidth", "--sizes", a.sizes,
               "--repeats", a.repeats]
        _, out = run(launch(2, cmd, launcher))
        sweep[backend] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        _, out = run(launch(2, [PY, REPO / "benchmarks" / "all_reduce.py", "--tree-worker",
                                "--repeats", a.repeats], launcher))
        trees[backend] = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        print(backend, "done", flush=True)
    rows = [[r["bytes"], *[sweep[b][i][k] for b in ("mpi", "ring")
                            for k in ("seconds", "bus_gbps")]]
            for i, r in enumerate(sweep["mpi"])]
    print(table(["bytes", "mpi s", "mpi GB/s", "ring s", "ring GB/s"], rows))
    print(table(["backend", "arrays", "bytes", "plain s", "bucketed s", "plain/bucketed"],
                [[b, t["arrays"], t["bytes"], t["plain_seconds"], t["bucketed_seconds"],
                  t["plain_seconds"] / t["bucketed_seconds"]] for b, t in trees.items()]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for b, rs in sweep.items():
        ax.plot([r["bytes"] for r in rs], [r["bus_gbps"] for r in rs], "o-", label=b)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("payload (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("all_sum between 2 ranks on one machine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(REPO / "benchmarks" / "results" / "all_reduce.png", dpi=100)
    print("saved", save("all_reduce", {"sweep": sweep, "lora_tree": trees}))


if __name__ == "__main__":
    main()
