"""The entry points really run MLX matmuls on the optimized BLAS."""

import json
import os
import sys

import pytest
from conftest import PY, run

from course_lib import blas

needs_switch = pytest.mark.skipif(
    blas.bundled_reference_blas() is None or blas.find_optimized_blas() is None,
    reason="needs Linux, the mlx-cpu wheel's reference BLAS and an installed OpenBLAS",
)


def _matmul(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "COURSE_LIB_FAST_BLAS_ACTIVE", "OPENBLAS_NUM_THREADS")}
    env.update(env_overrides)
    proc = run([PY, "-m", "course_lib.blas", "--matmul"], env=env, timeout=300)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


@needs_switch
def test_entry_point_switches_to_openblas_and_is_much_faster():
    fast = _matmul()
    slow = _matmul(COURSE_LIB_FAST_BLAS="0")
    # The entry point re-executed itself with OpenBLAS preloaded, and said so once.
    assert any("openblas" in lib for lib in fast["libraries"]), fast["libraries"]
    assert "using OpenBLAS" in fast["stderr"]
    # Opting out keeps the wheel's reference BLAS and prints nothing about it.
    assert not any("openblas" in lib for lib in slow["libraries"]), slow["libraries"]
    assert "using OpenBLAS" not in slow["stderr"]
    # Sanity bound only; the measured numbers belong to benchmarks/.
    assert slow["seconds"] / fast["seconds"] > 5, (slow["seconds"], fast["seconds"])


@needs_switch
def test_inherited_preload_still_gets_this_ranks_thread_share():
    """A rank started from a shell (or kernel) that already preloads OpenBLAS re-executes
    once more to take its share of the cores, and says nothing the second time."""
    lib = blas.find_optimized_blas()
    out = _matmul(LD_PRELOAD=lib, OMPI_COMM_WORLD_LOCAL_SIZE=str(os.cpu_count() or 1))
    assert out["openblas_threads"] == "1"
    assert any("openblas" in path for path in out["libraries"])
    assert "using OpenBLAS" not in out["stderr"]


@needs_switch
def test_notice_only_on_rank_zero_and_threads_split_between_local_ranks(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", str(os.cpu_count() or 1))
    env = blas.fast_blas_env()
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["LD_PRELOAD"].split(":")[0] == blas.find_optimized_blas()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert blas.fast_blas_env()["OPENBLAS_NUM_THREADS"] == "3"  # the user's choice wins


def test_opt_out_and_bad_override(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_LIB_FAST_BLAS", "0")
    assert blas.preload_path() is None
    assert "opted out" in blas.report() or sys.platform == "darwin"
    monkeypatch.delenv("COURSE_LIB_FAST_BLAS")
    monkeypatch.setenv("COURSE_LIB_OPENBLAS", str(tmp_path / "nope.so"))
    with pytest.raises(FileNotFoundError, match="COURSE_LIB_OPENBLAS"):
        blas.find_optimized_blas()


def test_ring_hostfile_counts_ranks_sharing_this_host(tmp_path, monkeypatch):
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5002"]]))
    monkeypatch.setenv("MLX_RANK", "1")
    assert blas._ring_ranks_on_this_host(str(hostfile)) == 2
    monkeypatch.setenv("MLX_RANK", "2")
    assert blas._ring_ranks_on_this_host(str(hostfile)) == 1


@needs_switch
def test_blas_threads_can_be_changed_in_a_running_process():
    """What --streams uses: each stream's OpenBLAS calls get their share of the cores."""
    code = ("from course_lib import blas; blas.reexec_with_fast_blas(); "
            "before = blas.blas_threads(); was = blas.set_blas_threads(1); "
            "print(before, was, blas.blas_threads())")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "COURSE_LIB_FAST_BLAS_ACTIVE", "OPENBLAS_NUM_THREADS")}
    before, was, after = run([PY, "-c", code], env=env).stdout.split()
    assert before == was == str(max(1, os.cpu_count() or 1)) and after == "1"
    with pytest.raises(ValueError, match="at least 1"):
        blas.set_blas_threads(0)
