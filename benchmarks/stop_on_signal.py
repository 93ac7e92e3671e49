"""Stopping a fine-tune with a signal: how long from the signal to the exit, and whether
the step in flight was saved.

Each case starts a 2-rank fine-tune (or 1 rank where said), waits until 2 steps are done,
sends the signal, and records the exit status, the seconds from signal to exit and the
checkpoint left behind:

- ``ctrl-c``, ``sigterm``: to ``scripts/mpirun.sh`` (which relays it through ``mpirun`` as
  SIGUSR1/SIGUSR2, ``course_lib.mpi``), the tiny model;
- ``sigterm-rank-1``: to rank 1 only (a scheduler's signal), the tiny model;
- ``ctrl-c-1-rank``: to a 1-rank fine-tune (no launcher), the tiny model;
- ``ctrl-c-smollm2``: to ``scripts/mpirun.sh``, SmolLM2 in float32, whose steps take
  seconds on a laptop CPU;
- ``ctrl-c-smollm2-bare-mpirun``: the same to a bare ``mpirun`` (Open MPI 5 ends every rank
  within 0.5 s of a signal: the step in flight is lost).

    .venv/bin/python benchmarks/stop_on_signal.py      # ~2 minutes on 2 cores

Writes ``results/stop_on_signal.json``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, save, table  # noqa: E402

from course_lib import checkpoint, metrics  # noqa: E402
from course_lib.mpi import find_open_mpi, mpirun_flags  # noqa: E402

PY = sys.executable
TINY = ["--model", "tiny", "--iters", "400", "--steps-per-report", "1", "--save-every", "1000",
        "--steps-per-eval", "1000", "--val-batches", "1", "--no-progress"]
SMOLLM2 = ["--model", "smollm2:float32", "--steps-per-report", "1", "--save-every", "1000",
           "--steps-per-eval", "1000", "--no-progress"]


def _fine_tune(args: list[str], out: Path, launcher: str) -> list[str]:
    cmd = [PY, "-m", "course_lib.fine_tune", *args, "--adapter-path", str(out)]
    if launcher == "mpirun.sh":
        return ["bash", str(REPO / "scripts" / "mpirun.sh"), "-np", "2", *cmd]
    if launcher == "bare mpirun":
        mpi = find_open_mpi()
        return [str(mpi.mpirun), "-np", "2", *mpirun_flags(2, mpi), *cmd]
    return cmd


def _rank_pid(launcher_pid: int, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("OMPI_COMM_WORLD_RANK") == str(rank):
                return child.pid
        except psutil.Error:
            pass
    raise RuntimeError(f"rank {rank} not found")


def case(name: str, args: list[str], launcher: str, signum: int, target: str = "launcher"):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.Popen(_fine_tune(args, out, launcher), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while len([r for r in metrics.read(out, missing_ok=True)
                   if r["split"] == "train"]) < 2:
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: ended early:\n{proc.communicate()[1][-2000:]}")
            time.sleep(0.05)
        pid = proc.pid if target == "launcher" else _rank_pid(proc.pid, 1)
        tic = time.monotonic()
        subprocess.run(["kill", f"-{signal.Signals(signum).name[3:]}", str(pid)], check=True)
        _, stderr = proc.communicate(timeout=300)
        seconds = time.monotonic() - tic
        stopped = [ln for ln in stderr.splitlines() if ln.startswith("Stopped by")]
        step = int(stopped[0].split("after step ")[1].split()[0]) if stopped else None
        saved = checkpoint.latest(out)
        return {"case": name, "launcher": launcher, "signal": signal.Signals(signum).name,
                "to": target, "exit": proc.returncode, "seconds": round(seconds, 2),
                "stopped_after_step": step, "checkpoint": saved,
                "step_saved": step is not None and saved == step}


def main() -> int:
    rows = [
        case("ctrl-c", TINY, "mpirun.sh", signal.SIGINT),
        case("sigterm", TINY, "mpirun.sh", signal.SIGTERM),
        case("sigterm-rank-1", TINY, "mpirun.sh", signal.SIGTERM, target="rank 1"),
        case("ctrl-c-1-rank", TINY, "python", signal.SIGINT),
        case("ctrl-c-smollm2", SMOLLM2, "mpirun.sh", signal.SIGINT),
        case("ctrl-c-smollm2-bare-mpirun", SMOLLM2, "bare mpirun", signal.SIGINT),
    ]
    keys = ["case", "launcher", "signal", "to", "exit", "seconds", "stopped_after_step",
            "checkpoint", "step_saved"]
    print(table(keys, [[r[k] for k in keys] for r in rows]))
    mpi = find_open_mpi()
    print("saved", save("stop_on_signal", {"mpi": f"{mpi.implementation} {mpi.version}",
                                           "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
