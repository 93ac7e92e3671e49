"""all_reduce_grads across real ranks, and the backend choice."""

import json

import pytest
from conftest import PY, REPO, json_objects, mlx_launch, mpirun, run

SCRIPT = REPO / "tests" / "scripts" / "grad_check.py"


def _results(stdout: str) -> list[dict]:
    return sorted(json_objects(stdout), key=lambda r: r["rank"])


@pytest.mark.distributed
def test_all_reduce_grads_two_mpi_ranks_equal_full_batch_gradient():
    results = _results(run(mpirun(2, PY, SCRIPT, "mpi"), timeout=120).stdout)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["size"] == 2 and r["backend"] == "mpi"
        # Each rank's own gradient is not the full-batch one...
        assert r["local_vs_full"] > 1e-4
        # ...but their all-reduced mean is.
        assert r["max_rel_error"] < 1e-5
        assert r["identity"] is False


@pytest.mark.distributed
def test_all_reduce_grads_two_ring_ranks_via_mlx_launch():
    results = _results(run(mlx_launch(2, PY, SCRIPT, "ring"), timeout=120).stdout)
    assert [(r["rank"], r["size"], r["backend"]) for r in results] == [(0, 2, "ring"), (1, 2, "ring")]
    assert all(r["max_rel_error"] < 1e-5 for r in results)


def test_all_reduce_grads_is_identity_at_one_rank():
    [r] = _results(run([PY, SCRIPT], timeout=120).stdout)
    assert (r["size"], r["backend"]) == (1, "none")
    assert r["identity"] is True  # the very same tree comes back
    assert r["max_rel_error"] == 0.0  # a one-rank "share" is the whole batch


def test_detect_backend_from_launcher_environment():
    from course_lib.distributed import detect_backend

    assert detect_backend({}) is None
    assert detect_backend({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert detect_backend({"MLX_RANK": "0", "MLX_HOSTFILE": "/tmp/h"}) == "ring"
    # What mlx.launch --backend nccl sets for each rank (mlx/_distributed_utils/launch.py).
    assert detect_backend({"MLX_RANK": "1", "MLX_WORLD_SIZE": "2",
                           "NCCL_HOST_IP": "10.0.0.1", "NCCL_PORT": "12345"}) == "nccl"


def test_unknown_backend_is_refused():
    from course_lib.distributed import init_world

    with pytest.raises(ValueError, match="--backend must be one of"):
        init_world("carrier-pigeon")


@pytest.mark.distributed
def test_broadcast_gives_every_rank_rank_zeros_tree(tmp_path):
    """distributed.broadcast: ranks that start apart (a seed per rank) end with rank 0's
    arrays, bit for bit."""
    script = tmp_path / "broadcast.py"
    script.write_text(
        "import hashlib, json\n"
        "import mlx.core as mx, numpy as np\n"
        "from course_lib.distributed import broadcast, init_world\n"
        "group, _ = init_world('mpi')\n"
        "mx.random.seed(group.rank())\n"
        "tree = {'w': mx.random.normal((3, 4)), 'b': [mx.random.normal((2,))]}\n"
        "digest = lambda t: hashlib.sha256(np.array(t['w']).tobytes() +\n"
        "                                  np.array(t['b'][0]).tobytes()).hexdigest()\n"
        "before = digest(tree)\n"
        "after = digest(broadcast(tree, group))\n"
        "print(json.dumps({'rank': group.rank(), 'before': before, 'after': after}))\n")
    results = _results(run(mpirun(2, PY, script), timeout=120).stdout)
    assert results[0]["before"] != results[1]["before"]
    assert results[0]["after"] == results[1]["after"] == results[0]["before"]


@pytest.mark.distributed
def test_an_uncaught_exception_on_one_rank_ends_the_job(tmp_path):
    """Rank 1 raises while rank 0 waits in an all-sum: without exiting past MPI's finalize,
    rank 1 would wait for rank 0 at exit and rank 0 for rank 1 in its collective."""
    script = tmp_path / "raise.py"
    script.write_text(
        "import mlx.core as mx\n"
        "from course_lib.distributed import init_world\n"
        "group, _ = init_world('mpi')\n"
        "if group.rank() == 1:\n"
        "    raise TypeError('rank 1 fails here')\n"
        "mx.eval(mx.distributed.all_sum(mx.ones(3), group=group))\n")
    proc = run(mpirun(2, PY, script), check=False, timeout=60)
    assert proc.returncode != 0
    assert "TypeError: rank 1 fails here" in proc.stderr


@pytest.mark.distributed
def test_ranks_lines_never_share_a_line_under_unbuffered_output(tmp_path):
    """Under PYTHONUNBUFFERED=1 print writes the text and the newline apart, and mpirun
    merges the ranks' streams: a line of one rank lands between another's text and its
    newline (chapter 1 read two JSON records from one line on CI). init_world makes every
    line one write. (mpirun may still cut a line where it reads a long burst of output:
    a few lines per rank are what this promises.)"""
    from course_lib.launch import child_env

    script = tmp_path / "lines.py"
    script.write_text(
        "import json\n"
        "from course_lib.distributed import init_world\n"
        "group, _ = init_world('mpi')\n"
        "for i in range(40):\n"
        "    print(json.dumps({'rank': group.rank(), 'i': i, 'pad': 'x' * 60}))\n")
    for _ in range(3):  # without init_world's fix, about 2 lines in 80 are merged per run
        proc = run(mpirun(2, PY, script), timeout=60, env=child_env(PYTHONUNBUFFERED="1"))
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        assert len(lines) == 80 and all(json.loads(line)["pad"] for line in lines)
