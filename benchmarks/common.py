"""Shared helpers for the benchmark scripts: run a command with the course's BLAS set-up,
print a table, save results as JSON with the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from course_lib import blas  # noqa: E402
from course_lib.launch import child_env, mlx_launch_command, mpirun_command  # noqa: E402

PY = sys.executable


def env_for(ranks: int) -> dict:
    """The environment for ``ranks`` ranks on this machine: OpenBLAS preloaded (as the
    course's entry points do) with the cores shared out, ``OPENBLAS_NUM_THREADS`` = cores //
    ranks (at least 1)."""
    env = child_env()
    lib = blas.preload_path()
    if lib:
        env["LD_PRELOAD"] = lib
    env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    return env


# Taken when a benchmark script imports this module, i.e. as it starts (machine() is called
# when the results are saved, at the end, when the benchmark's own load shows).
LOAD_AVERAGE_AT_START = os.getloadavg()


def machine() -> dict:
    """What the numbers were measured on."""
    import mlx.core as mx
    import mlx_lm

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__, "blas": blas.report(),
            "load_average_at_start": LOAD_AVERAGE_AT_START}


def launch(ranks: int, cmd: list, launcher: str = "mpirun") -> list:
    """``cmd`` on ``ranks`` ranks (plain for one)."""
    if ranks == 1:
        return cmd
    return mpirun_command(ranks, *cmd) if launcher == "mpirun" else mlx_launch_command(ranks, *cmd)


def run(cmd: list, env: dict | None = None, timeout: float = 1800) -> tuple[float, str]:
    """Run ``cmd`` (course BLAS environment unless ``env``); return (wall seconds, stdout).
    Raises RuntimeError with the output's tail when it fails."""
    tic = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=env or blas.fast_blas_env(child_env()),
                          cwd=REPO)
    seconds = time.perf_counter() - tic
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def median(values):
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def save(name: str, payload: dict) -> Path:
    """Write ``results/NAME.json`` with the machine description and a timestamp."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def random_model_folder(config: dict, source: Path, out: Path, seed: int,
                        dtype: str | None = None) -> Path:
    """A llama-architecture model of ``config`` with random weights (``mx.random.seed(seed)``,
    cast to ``dtype`` when given) saved in ``out`` as a folder ``mlx_lm.load`` reads, with
    the tokenizer files of model folder ``source``. Returns ``out``."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if dtype is not None:
        model.update(tree_map(lambda p: p.astype(getattr(mx, dtype)), model.parameters()))
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out
