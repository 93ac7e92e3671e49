"""One rank of ``benchmarks/sharding.py``: ``python -m course_lib.fine_tune`` as it is,
plus two measurements around it. Usage: ``sharding_worker.py OUT_DIR FINE_TUNE_ARGS...``.

- The memory limit. ``SHARDING_LIMIT_GB`` (1e9 bytes) is set with ``mx.set_memory_limit``.
  On this CPU build MLX treats it as a guideline only (measured: a 1 GiB array allocates
  under a 100 MiB limit), so a thread also reads ``mx.get_active_memory()`` every 5 ms and
  ends the rank (exit status 5) the moment it holds more than the limit: the run "does
  not fit", as it would not on a machine with that much memory.
- The bytes on the wire. Around every training step the rank reads its own TCP sockets'
  counters (``course_lib.traffic.socket_bytes``; run under ``mpirun --mca btl self,tcp``
  so that MPI talks TCP on localhost), after evaluating the step, so the window holds
  exactly that step's collectives.

Writes ``OUT_DIR/rank{r}.json``: ``{"over_limit", "active_gb_at_stop", "peak_gb_at_exit"
(the final save included), "steps": [{"sent", "received", "seconds"}]}``.
"""

from course_lib.blas import reexec_with_fast_blas

reexec_with_fast_blas()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402

from course_lib import traffic  # noqa: E402

out_dir = Path(sys.argv[1])
rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("MLX_RANK", "0")))
record = {"rank": rank, "over_limit": False, "steps": []}
limit = float(os.environ.get("SHARDING_LIMIT_GB", "0")) * 1e9


def write():
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


if limit:
    mx.set_memory_limit(int(limit))

    def guard():
        while True:
            active = mx.get_active_memory()
            if active > limit:
                record.update(over_limit=True, active_gb_at_stop=active / 1e9,
                              peak_gb_at_stop=mx.get_peak_memory() / 1e9,
                              steps_done=len(record["steps"]))
                write()
                print(f"rank {rank}: {active / 1e9:.2f} GB active, over the memory limit of "
                      f"{limit / 1e9:.2f} GB: does not fit", file=sys.stderr, flush=True)
                os._exit(5)
            time.sleep(0.005)

    threading.Thread(target=guard, daemon=True).start()

import course_lib.fine_tune.loop as loop  # noqa: E402

make_step = loop.make_step


def measured_make_step(model, optimizer, *args, **kwargs):
    step = make_step(model, optimizer, *args, **kwargs)
    pid = os.getpid()

    def measured(micro):
        before = traffic.socket_bytes([pid])[pid]
        tic = time.perf_counter()
        result = step(micro)
        mx.eval(result, model.parameters(), optimizer.state)
        seconds = time.perf_counter() - tic
        after = traffic.socket_bytes([pid])[pid]
        record["steps"].append({"sent": after["sent"] - before["sent"],
                                "received": after["received"] - before["received"],
                                "seconds": seconds})
        return result

    return measured


loop.make_step = measured_make_step

from course_lib.fine_tune.cli import main  # noqa: E402

status = main(sys.argv[2:])
record["peak_gb_at_exit"] = mx.get_peak_memory() / 1e9  # the final save included
write()
sys.exit(status)
