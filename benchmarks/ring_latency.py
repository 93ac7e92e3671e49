"""Where the ring backend's small all-reduces lose their time on one machine: in MLX's ring
(its TCP sockets), or in ``mlx.launch``, whose output loop keeps a core busy?

The same two ranks of ``python -m course_lib.distributed bandwidth --backend ring`` run
twice: started by ``mlx.launch -n 2``, and started by hand with the two variables the
launcher sets for a local ring (``MLX_RANK``, and ``MLX_HOSTFILE`` naming a JSON list of
each rank's ``ip:port``, as ``mlx/_distributed_utils/launch.py`` writes it), with the
ranks' output going to files so that nothing else runs. Both get one OpenBLAS thread per
rank. Runs alternate; each cell is the median over ``--runs`` runs of each run's median of
``--repeats`` all-reduces.

    python benchmarks/ring_latency.py [--runs 5] [--sizes 4KiB,64KiB,1MiB,16MiB]

Prints a table and writes results/ring_latency.json.
"""

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from common import PY, blas, child_env, median, mlx_launch_command, save, table


def by_hand(sizes: str, repeats: int, port: int) -> list[dict]:
    """Two ring ranks started as plain processes (one OpenBLAS thread each, as the
    course's entry points give each of two local ranks); rank 0's JSON lines."""
    cmd = [PY, "-m", "course_lib.distributed", "bandwidth", "--backend", "ring",
           "--sizes", sizes, "--repeats", str(repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = Path(tmp) / "ring.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
        procs = []
        try:
            for rank in (0, 1):
                env = blas.fast_blas_env(child_env(MLX_RANK=str(rank),
                                                   MLX_HOSTFILE=str(hostfile)))
                env["OPENBLAS_NUM_THREADS"] = "1"
                with open(Path(tmp) / f"rank{rank}.out", "w") as out:
                    procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL,
                                                  env=env))
            for proc in procs:
                if proc.wait(timeout=300) != 0:
                    raise RuntimeError(f"a ring rank started by hand exited {proc.returncode}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = (Path(tmp) / "rank0.out").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def launched(sizes: str, repeats: int) -> list[dict]:
    """The same two ranks under ``mlx.launch -n 2``; rank 0's JSON lines."""
    cmd = mlx_launch_command(2, PY, "-m", "course_lib.distributed", "bandwidth", "--sizes",
                             sizes, "--repeats", repeats)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          env=blas.fast_blas_env(child_env()))
    if proc.returncode != 0:
        raise RuntimeError(f"mlx.launch exited {proc.returncode}: {proc.stderr[-500:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB")
    a = p.parse_args()
    runs = {"mlx.launch -n 2": [], "started by hand": []}
    for i in range(a.runs):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            rows = (launched(a.sizes, a.repeats) if name.startswith("mlx.launch")
                    else by_hand(a.sizes, a.repeats, 35600 + 10 * i))
            runs[name].append(rows)
            print(f"run {i} {name}: " + ", ".join(f"{r['bytes']} B {r['seconds'] * 1e3:.3f} ms"
                                                for r in rows), flush=True)
    sizes = [r["bytes"] for r in runs["mlx.launch -n 2"][0]]
    summary = {name: {str(b): median([rows[j]["seconds"] for rows in all_rows])
                      for j, b in enumerate(sizes)} for name, all_rows in runs.items()}
    rows = [[f"{b // 1024} KiB" if b < 2**20 else f"{b // 2**20} MiB",
             *(1e3 * summary[name][str(b)] for name in runs),
             summary["mlx.launch -n 2"][str(b)] / summary["started by hand"][str(b)]]
            for b in sizes]
    print(table(["payload", *(f"{n} ms" for n in runs), "launch / by hand"], rows))
    print("saved", save("ring_latency", {"runs": a.runs, "repeats": a.repeats,
                                         "median_seconds": summary, "all": runs}))


if __name__ == "__main__":
    main()
