"""The fine-tune across the two-host lab over each link shape, against the cost model.

Needs root and Linux (``course_lib.lab``). It brings up its own lab (``course-lab-bench``),
measures, brings it down, and writes ``benchmarks/results/lab_link_shapes.json``, which
chapters 3 and 5 show. What it measures, per link shape (unshaped veth, thunderbolt,
ethernet-1g, wifi):

1. **all-reduce bandwidth**: ``python -m course_lib.distributed bandwidth`` on two ranks, one
   per host, with ``mpirun`` (the lab's defaults: one TCP connection per pair of ranks),
   ``mpirun`` with two (``btl_tcp_links 2``) and ``mlx.launch`` (ring backend);
2. **gradient averaging alone**: ``benchmarks/lab_grad_allreduce.py`` (the default model's
   LoRA gradients, plain and bucketed, after a barrier: no waiting for computation);
3. **the fine-tune**: per-step time, time in the all-reduce phase and tokens/s
   (``--step-timing --steps-per-report 1``; medians over steps) for 1 rank on host a and for
   2 ranks (``mpirun`` as the lab starts it), for the course's default LoRA (r = 8, 432 KiB
   of gradients per step, one all-reduce per array), the same with ``--all-reduce
   bucketed`` (one all-reduce), and a large LoRA (r = 256, 13.5 MiB, bucketed); rows cut at
   64 tokens (``--max-seq-length 64``; every row of the sample has at least 62), so that
   every step trains on as many tokens. The CPU is shared (with the other rank, and here
   with other people's jobs), so the 2-rank run changes the link's shape *during* the run,
   in blocks of steps cycling through the shapes, and each shape's median is taken over its
   blocks: a change in load then hits every shape alike. The pair (1 rank, 2 ranks) is
   repeated three times; the table gives the median over the repeats of each run's median.

Then the cost model (``course_lib.traffic.predicted_step_seconds``) is evaluated with the
1-rank compute time, each shape's nominal bandwidth and the lab's measured per-message
latency (this kernel has no netem, so the shapes' own latencies are not emulated), and
compared with the measured steps.

    python benchmarks/lab_link_shapes.py [--quick] [--out benchmarks/results/lab_link_shapes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save  # benchmarks/common.py

from course_lib import lab as labmod
from course_lib import metrics
from course_lib.lab import SHAPES, Lab
from course_lib.lab_experiments import run_shape_blocks
from course_lib.traffic import predicted_step_seconds, ring_all_reduce_seconds

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "lab_link_shapes.json"
SCRATCH = REPO / "runs" / "lab_bench"  # not in git; in the checkout both hosts share
SHAPE_ORDER = ["none", "thunderbolt", "ethernet-1g", "wifi"]
LAUNCHERS = ["mpi", "mpi-2links", "ring"]
# Every row of the sample data has at least 62 tokens; cut at 64, every step trains on the
# same number of tokens, so that steps differ only by the link and the CPU's noise.
SEQ = ["--max-seq-length", "64"]
CONFIGS = {  # name: extra fine-tune options (also --max-seq-length 64)
    "default": ["--all-reduce", "plain"],
    "default-bucketed": ["--all-reduce", "bucketed"],
    "lora-r256-bucketed": ["--lora-rank", "256", "--all-reduce", "bucketed"],
}
PY = sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def launch(lab: Lab, launcher: str, *cmd) -> list[str]:
    if launcher == "ring":
        return lab.mlx_launch_command(*cmd)
    return lab.mpirun_command(2, *cmd, tcp_links=2 if launcher == "mpi-2links" else None)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run(cmd, env, timeout=600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
                           f"\n{proc.stdout[-2000:]}")
    return proc.stdout


def session(lab: Lab) -> dict:
    """What chapter 3 shows of a live lab, stored for machines where it cannot run."""
    hostnames = run(lab.mpirun_command(2, "hostname"), lab.env()).split()
    hello = {}
    for launcher in ("mpi", "ring"):
        rows = json_lines(run(launch(lab, launcher, PY, "-m", "course_lib.distributed", "hello"),
                              lab.env()).replace("\r", ""))
        hello[launcher] = sorted(({k: r[k] for k in ("rank", "size", "host", "sent", "received",
                                                     "backend")} for r in rows),
                                 key=lambda r: r["rank"])
    return {"hostfile": lab.hostfile.read_text(), "hostfile_json": lab.hostfile_json.read_text(),
            "ssh_b_to_a": lab.run("b", *lab.ssh_command("a", "hostname")).stdout.strip(),
            "mpirun_hostname": sorted(hostnames), "hello": hello,
            "status": {h: {k: v for k, v in st.items() if k in ("namespace", "address",
                                                                 "hostname", "listening")}
                       for h, st in lab.status()["hosts"].items()}}


def measure_bandwidth(lab: Lab, sizes: str, repeats: int) -> dict:
    out = {}
    for shape in SHAPE_ORDER:
        lab.set_shape(shape, log=log)
        out[shape] = {}
        for launcher in LAUNCHERS:
            cmd = launch(lab, launcher, PY, "-m", "course_lib.distributed", "bandwidth",
                         "--sizes", sizes, "--repeats", str(repeats))
            out[shape][launcher] = json_lines(run(cmd, lab.env()))
            big = out[shape][launcher][-1]
            log(f"bandwidth {shape} {launcher}: {big['bus_gbps'] * 8:.3f} Gbit/s at "
                f"{big['bytes'] >> 20} MiB, {out[shape][launcher][0]['seconds'] * 1e3:.2f} ms "
                f"at {out[shape][launcher][0]['bytes'] >> 10} KiB")
    return out


def measure_grad_allreduce(lab: Lab, lora_ranks: list[int], repeats: int) -> dict:
    out = {}
    for shape in SHAPE_ORDER:
        lab.set_shape(shape, log=lambda m: None)
        out[shape] = {}
        for launcher in LAUNCHERS:
            out[shape][launcher] = {}
            for r in lora_ranks:
                cmd = launch(lab, launcher, PY, str(REPO / "benchmarks" / "lab_grad_allreduce.py"),
                             "--lora-rank", str(r), "--repeats", str(repeats))
                [row] = json_lines(run(cmd, lab.env()))
                out[shape][launcher][str(r)] = row
                log(f"gradient averaging {shape} {launcher} r={r}: plain "
                    f"{row['plain_seconds'] * 1e3:.2f} ms, bucketed "
                    f"{row['bucketed_seconds'] * 1e3:.2f} ms ({row['bytes']} B)")
    return out


def fine_tune_args(folder: Path, iters: int, extra: list[str]) -> list[str]:
    return [PY, "-m", "course_lib.fine_tune", "--no-progress", "--model", "tiny", "--iters", str(iters),
            "--steps-per-report", "1", "--steps-per-eval", "100000", "--save-every", "100000",
            "--val-batches", "1", "--step-timing", "--adapter-path", str(folder), *SEQ, *extra]


def train_records(folder: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in metrics.read(folder, missing_ok=True)
            if r["split"] == "train"}


def step_stats(records: list[dict]) -> dict:
    """Medians over steps: step seconds, each phase, tokens/s."""
    def med(xs):
        return statistics.median(xs) if xs else None

    return {
        "steps": len(records),
        "step_seconds": med([r["seconds"] for r in records]),
        "phase_seconds": {p: med([r["phase_seconds"][p] for r in records])
                          for p in ("data", "forward_backward", "all_reduce", "optimizer")},
        "tokens_per_second": med([r["tokens_per_second"] for r in records]),
        "step_seconds_all": [round(r["seconds"], 5) for r in records],
    }


def median_stats(runs: list[dict]) -> dict:
    """The median over repeated runs of each of :func:`step_stats`' medians."""
    med = statistics.median
    return {
        "steps": sum(r["steps"] for r in runs),
        "step_seconds": med(r["step_seconds"] for r in runs),
        "phase_seconds": {p: med(r["phase_seconds"][p] for r in runs)
                          for p in runs[0]["phase_seconds"]},
        "tokens_per_second": med(r["tokens_per_second"] for r in runs),
        "runs_step_seconds": [round(r["step_seconds"], 5) for r in runs],
    }


def solo_run(lab: Lab, config: str, iters: int) -> list[dict]:
    folder = SCRATCH / f"{config}-solo"
    cmd = lab.host_command("a", *fine_tune_args(folder, iters, CONFIGS[config]), cwd=REPO)
    run(cmd, lab.env(OPENBLAS_NUM_THREADS="1"))  # one host = one core, like each rank
    recs = train_records(folder)
    return [recs[i] for i in sorted(recs) if i > 1]  # step 1 warms up


def toggled_run(lab: Lab, config: str, block: int, cycles: int) -> tuple[dict, dict, dict]:
    """One 2-rank mpirun fine-tune whose link cycles through SHAPE_ORDER every ``block``
    steps, ``cycles`` times (``run_shape_blocks``). Returns ``(records per shape,
    counters delta on host a, summary)``."""
    folder = SCRATCH / f"{config}-duo"
    iters = 1 + block * cycles * len(SHAPE_ORDER)
    cmd = lab.mpirun_command(2, *fine_tune_args(folder, iters, CONFIGS[config]))
    before = lab.counters("a")
    by_shape = run_shape_blocks(lab, cmd, folder / "metrics.jsonl", SHAPE_ORDER, block, cycles,
                                timeout=900)
    after = lab.counters("a")
    summary = json.loads((folder / "summary.json").read_text())
    return by_shape, {k: after[k] - before[k] for k in after}, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--bandwidth-runs", type=int, default=0, metavar="N",
                        help="only the bandwidth table, N times over (each a median of 10 "
                        "all-reduces per cell), into results/lab_bandwidth_runs.json: how "
                        "much one run's cell can differ from the next")
    args = parser.parse_args()
    reason = labmod.unavailable_reason()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 1
    if args.bandwidth_runs:
        return bandwidth_runs(args.bandwidth_runs)
    block, cycles, solo_iters, repeats = (3, 1, 8, 5) if args.quick else (4, 2, 13, 10)
    fine_tune_repeats = 2 if args.quick else 3
    configs = args.configs.split(",")
    loads = [("start", os.getloadavg())]
    SCRATCH.mkdir(parents=True, exist_ok=True)
    lab = Lab("course-lab-bench")
    result = {
        "what": "course_lib fine-tune across the two-host lab (two network namespaces joined "
                "by a veth pair, sshd in each, mpirun/mlx.launch over SSH), per link shape",
        "kernel": platform.release(),
        "shapes": {k: {"bits_per_second": v.bits_per_second,
                       "latency_seconds": v.latency_seconds, "stands_for": v.stands_for,
                       "source": v.source} for k, v in SHAPES.items()},
        "netem": labmod.netem_available(),
        "notes": [],
    }
    with lab.running(shape="none", log=log):
        t0 = time.monotonic()
        result["session"] = session(lab)
        result["bandwidth"] = measure_bandwidth(lab, "4KiB,64KiB,1MiB,16MiB", repeats)
        loads.append(("after bandwidth", os.getloadavg()))
        result["grad_allreduce"] = measure_grad_allreduce(lab, [8, 256], repeats * 2)
        loads.append(("after gradient averaging", os.getloadavg()))
        result["fine_tune"] = {}
        for config in configs:
            # Repeats of (1 rank, then 2 ranks cycling through the shapes), so that both
            # see the machine's load alike; medians over each run's steps, then the median
            # over the repeats.
            solo_runs, duo_runs, counters = [], [], []
            for rep in range(fine_tune_repeats):
                solo_runs.append(step_stats(solo_run(lab, config, solo_iters)))
                by_shape, delta, summary = toggled_run(lab, config, block, cycles)
                duo_runs.append({s: step_stats(r) for s, r in by_shape.items()})
                counters.append(delta)
                log(f"{config} #{rep + 1}: 1 rank {solo_runs[-1]['step_seconds']:.3f} s/step; "
                    "2 ranks " + ", ".join(f"{s} {d['step_seconds']:.3f}"
                                           for s, d in duo_runs[-1].items()))
            loads.append((f"after {config}", os.getloadavg()))
            # The token count rides with the gradients: plain makes one all-reduce per LoRA
            # array (56) and one for the count; bucketed one in all (< 32 MiB).
            calls = 57 if "bucketed" not in CONFIGS[config] else 1
            result["fine_tune"][config] = {
                "options": [*SEQ, *CONFIGS[config]],
                "trainable_parameters": summary["trainable_parameters"],
                "gradient_bytes": summary["trainable_parameters"] * 4,
                "all_reduce_calls_per_step": calls,
                "repeats": fine_tune_repeats,
                "solo": median_stats(solo_runs),
                "duo": {s: median_stats([d[s] for d in duo_runs]) for s in SHAPE_ORDER},
                "duo_counters_host_a": counters,
                "duo_iterations": summary["iterations"],
            }
        result["seconds"] = time.monotonic() - t0
    loads.append(("end", os.getloadavg()))
    result["load_average"] = [{"when": w, "1min": la[0], "5min": la[1], "15min": la[2]}
                              for w, la in loads]
    result["model"] = fit_model(result)
    if Path(args.out) == RESULTS:
        path = save("lab_link_shapes", result)  # adds the machine and a timestamp
    else:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {path}")
    print_table(result)
    return 0


def bandwidth_runs(n: int, sizes: str = "4KiB,64KiB,1MiB,16MiB", repeats: int = 10) -> int:
    """The lab's bandwidth table ``n`` times over; prints each cell's median and range."""
    lab, loads, runs = Lab("course-lab-bench"), [os.getloadavg()], []
    with lab.running(shape="none", log=log):
        for i in range(n):
            runs.append(measure_bandwidth(lab, sizes, repeats))
            loads.append(os.getloadavg())
    path = save("lab_bandwidth_runs", {
        "what": "the two-host lab's all-reduce table (as in lab_link_shapes.json's bandwidth) "
                f"measured {n} times in a row, each cell a median of {repeats} all-reduces",
        "runs": runs, "load_average_1min": [la[0] for la in loads]})
    log(f"wrote {path}")
    for shape in SHAPE_ORDER:
        for launcher in LAUNCHERS:
            cells = []
            for j in range(len(runs[0][shape][launcher])):
                ms = sorted(r[shape][launcher][j]["seconds"] * 1e3 for r in runs)
                cells.append(f"{statistics.median(ms):8.3f} ({ms[0]:.3f}-{ms[-1]:.3f})")
            print(f"{shape:12} {launcher:11} " + "  ".join(cells) + "  ms")
    return 0


def fit_model(result: dict) -> dict:
    """The cost model next to the measured 2-rank steps.

    ``compute`` (forward+backward+data) and ``fixed`` (optimizer) come from the 1-rank runs;
    the lab's per-message latency is half the median 4 KiB all-reduce time on the unshaped
    link (mpirun, the launcher of the 2-rank runs); the bandwidth is
    the shape's nominal rate, or for the unshaped veth the measured 16 MiB bus bandwidth.
    ``predicted_lab`` uses the lab's latency (what the lab should measure, since latency is
    not emulated here); ``predicted_real`` the shape's own latency (what the real link
    would give).
    """
    bw = result["bandwidth"]
    lat_lab = bw["none"]["mpi"][0]["seconds"] / 2
    unshaped_bps = bw["none"]["mpi"][-1]["bus_gbps"] * 8e9
    out = {"lab_latency_seconds": lat_lab, "unshaped_bits_per_second": unshaped_bps,
           "configs": {}}
    for config, ft in result["fine_tune"].items():
        ph = ft["solo"]["phase_seconds"]
        compute = ph["forward_backward"] + ph["data"]
        fixed = ph["optimizer"]
        rows = {}
        for shape, duo in ft["duo"].items():
            bps = SHAPES[shape].bits_per_second if shape in SHAPES else unshaped_bps
            real_lat = SHAPES[shape].latency_seconds if shape in SHAPES else lat_lab
            calls = ft["all_reduce_calls_per_step"]
            rows[shape] = {
                "bits_per_second": bps,
                "measured_step_seconds": duo["step_seconds"],
                "measured_all_reduce_phase_seconds": duo["phase_seconds"]["all_reduce"],
                "measured_forward_backward_seconds": duo["phase_seconds"]["forward_backward"],
                "model_all_reduce_seconds_lab": ring_all_reduce_seconds(
                    ft["gradient_bytes"], 2, bps, lat_lab, calls),
                "predicted_lab": predicted_step_seconds(
                    2, compute, fixed, ft["gradient_bytes"], bps, lat_lab, calls),
                "predicted_real": predicted_step_seconds(
                    2, compute, fixed, ft["gradient_bytes"], bps, real_lat, calls),
            }
        base = rows["thunderbolt"]
        for row in rows.values():
            row["measured_minus_thunderbolt"] = (row["measured_step_seconds"]
                                                 - base["measured_step_seconds"])
            row["model_minus_thunderbolt"] = (row["model_all_reduce_seconds_lab"]
                                              - base["model_all_reduce_seconds_lab"])
        out["configs"][config] = {"compute_seconds": compute, "fixed_seconds": fixed,
                                  "solo_step_seconds": ft["solo"]["step_seconds"],
                                  "shapes": rows}
    return out


def print_table(result: dict) -> None:
    print(f"{'config':18} {'link':12} {'step s':>8} {'all-red s':>9} {'tok/s':>7} "
          f"{'model s':>8} {'d meas':>8} {'d model':>8}")
    for config, ft in result["fine_tune"].items():
        s = ft["solo"]
        print(f"{config:18} {'1 rank':12} {s['step_seconds']:8.3f} {'':>9} "
              f"{s['tokens_per_second']:7.0f}")
        for shape, duo in ft["duo"].items():
            m = result["model"]["configs"][config]["shapes"][shape]
            print(f"{'':18} {shape:12} {duo['step_seconds']:8.3f} "
                  f"{duo['phase_seconds']['all_reduce']:9.3f} {duo['tokens_per_second']:7.0f} "
                  f"{m['predicted_lab']:8.3f} {m['measured_minus_thunderbolt']:8.3f} "
                  f"{m['model_minus_thunderbolt']:8.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
