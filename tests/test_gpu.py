"""The course on NVIDIA GPUs (MLX's CUDA build, NCCL between GPUs). Every test here skips
where MLX sees no CUDA GPU, as on the course's CPU machines and in CI."""

import json

import mlx.core as mx
import pytest
from conftest import PY, fine_tune_cmd, read_train_losses, run

cuda = getattr(mx, "cuda", None)
pytestmark = pytest.mark.skipif(cuda is None or not cuda.is_available(),
                                reason="no CUDA GPU for MLX (install MLX's CUDA build: "
                                "COURSE_CUDA=1 bash scripts/setup.sh)")
SHORT = ["--iters", "6", "--steps-per-report", "1", "--steps-per-eval", "100",
         "--val-batches", "1", "--seed", "3"]


def _gpu_count() -> int:
    import subprocess

    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")])


def test_fine_tune_runs_on_the_gpu_compiled_or_not(tmp_path):
    run(fine_tune_cmd(*SHORT, "--adapter-path", tmp_path / "plain"))
    run(fine_tune_cmd(*SHORT, "--compile", "--adapter-path", tmp_path / "compiled"))
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert plain["compiled"] is False  # compile_by_default: not on CUDA (measured slower)
    assert plain["final_train_loss"] < plain["first_train_loss"]
    one, two = read_train_losses(tmp_path / "plain"), read_train_losses(tmp_path / "compiled")
    assert max(abs(one[k] - two[k]) / one[k] for k in one) < 1e-4


@pytest.mark.distributed
@pytest.mark.skipif(_gpu_count() < 2 if cuda is not None and cuda.is_available() else True,
                    reason="needs 2 NVIDIA GPUs")
def test_two_gpus_with_nccl_follow_the_one_gpu_loss_curve(tmp_path):
    from course_lib.launch import child_env

    run(fine_tune_cmd(*SHORT, "--adapter-path", tmp_path / "one"))
    launcher = str(__import__("pathlib").Path(PY).parent / "mlx.launch")
    run([launcher, "--backend", "nccl", "-n", "2", "--",
         *fine_tune_cmd(*SHORT, "--adapter-path", tmp_path / "two")], env=child_env())
    one, two = read_train_losses(tmp_path / "one"), read_train_losses(tmp_path / "two")
    assert max(abs(one[k] - two[k]) / one[k] for k in one) < 1e-4
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["backend"] == "nccl"
