"""The output side under stress (issue 14): full disks, read-only folders, permission
denied, a file as the output path, Ctrl-C and SIGTERM to live ranks, two runs in one
folder, and a kill-and-resume soak. Every case runs the real command line."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import PY, REPO, fine_tune_cmd, mpirun, read_train_losses, run

from course_lib import atomic, checkpoint, launch
from course_lib.fine_tune.interrupts import StopAgreement, resume_command
from course_lib.fine_tune.outputs import LOCK_FILE, FolderInUse, FolderLock, Outputs

_spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

ARGS = ["--iters", "24", *soak.TRAIN_ARGS]  # fine_tune_cmd adds --model tiny --no-progress
STOP_BOUND_S = 30  # a failure bound, not a target: measured stops are ~1-3 s


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The uninterrupted 2-rank run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(mpirun(2, *fine_tune_cmd(*ARGS, "--adapter-path", out)))
    return out


def _assert_equals_reference(out: Path, reference: Path):
    done, ref = read_train_losses(out), read_train_losses(reference)
    assert sorted(done) == sorted(ref)
    assert max(abs(done[i] - ref[i]) / abs(ref[i]) for i in ref) <= 1e-5
    a = mx.load(str(out / "adapters.safetensors"))
    b = mx.load(str(reference / "adapters.safetensors"))
    assert sorted(a) == sorted(b)
    assert max(mx.abs(a[k] - b[k]).max().item() for k in b) <= 1e-5


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != LOCK_FILE}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs of its own (root only: mount(2) needs CAP_SYS_ADMIN); a disk we may
    fill or make read-only. Yields a function ``mount(size) -> Path``."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a tmpfs")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``folder``'s file system."""
    st = os.statvfs(folder)
    ballast = folder / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return ballast


def _rank_pids(mpirun_pid: int) -> dict[int, int]:
    """rank -> PID of the ranks that ``mpirun`` (PID ``mpirun_pid``) started, from each
    child's ``OMPI_COMM_WORLD_RANK`` (psutil reads it on Linux and macOS alike)."""
    import psutil

    found = {}
    for child in psutil.Process(mpirun_pid).children(recursive=True):
        try:
            rank = child.environ().get("OMPI_COMM_WORLD_RANK")
        except (psutil.Error, OSError):
            continue
        if rank is not None:
            found[int(rank)] = child.pid
    return found


def _start(cmd, **env) -> subprocess.Popen:
    """Start ``cmd`` the way a terminal would: SIGINT at its default (a background job of a
    non-interactive shell would inherit it ignored)."""
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=launch.child_env(**env),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120):
    """Wait until ``out``'s metrics show train step ``step`` (the run is in its loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if any(r["split"] == "train" and r["iteration"] >= step
                   for r in _records(out)):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def _records(out: Path) -> list[dict]:
    from course_lib import metrics

    return metrics.read(out, missing_ok=True)


def _finish(proc: subprocess.Popen, since: float) -> tuple[str, str, float]:
    stdout, stderr = proc.communicate(timeout=120)
    return stdout, stderr, time.monotonic() - since


# ----------------------------------------------------------------------------- atomic files

def test_a_full_disk_is_a_write_error_and_leaves_no_temporary(tmpfs):
    disk = tmpfs("256k")
    target = disk / "summary.json"
    atomic.write_json(target, {"old": True})
    with pytest.raises(atomic.WriteError) as e:
        atomic.write_json(target, {"x": "y" * 400_000})
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"cannot write {target}: No space left on device (free some space)"
    assert json.loads(target.read_text()) == {"old": True}
    with pytest.raises(atomic.WriteError, match="No space left on device"):
        atomic.save_safetensors(disk / "a.safetensors", {"w": mx.zeros((100_000,))})
    assert sorted(p.name for p in disk.iterdir()) == ["summary.json"]


def test_a_failed_checkpoint_save_removes_its_own_files_only(tmpfs, tmp_path):
    import mlx.nn as nn
    import mlx.optimizers as optim

    disk = tmpfs("1m")
    model, opt = nn.Linear(200, 200), optim.Adam(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    checkpoint.save(disk, 4, model, opt, {"settings": {}})
    before = _snapshot(disk)
    _fill(disk, leave=200_000)  # room for the weights (160 kB), not for Adam's two moments
    with pytest.raises(atomic.WriteError, match="0000008_optimizer.safetensors: No space"):
        checkpoint.save(disk, 8, model, opt, {"settings": {}})
    (disk / "ballast").unlink()
    assert _snapshot(disk) == before and checkpoint.latest(disk) == 4


def test_a_metrics_line_that_does_not_fit_is_cut_back(tmpfs):
    disk = tmpfs("64k")
    outputs = Outputs(disk / "run", enabled=True)
    outputs.start({"model": "x"})
    outputs.metric({"iteration": 1, "split": "train", "loss": 1.0})
    before = (disk / "run" / "metrics.jsonl").read_text()
    _fill(disk, leave=0)
    outputs.metric({"iteration": 2, "split": "train", "loss": 2.0, "pad": "x" * 50_000})
    assert outputs.error is not None and outputs.error.errno == errno.ENOSPC
    assert (disk / "run" / "metrics.jsonl").read_text() == before  # no half line
    outputs.metric({"iteration": 3, "split": "train", "loss": 3.0})  # skipped from now on
    assert (disk / "run" / "metrics.jsonl").read_text() == before
    with pytest.raises(atomic.WriteError):
        outputs.finish({"world_size": 1, "global_batch": 8}, [])
    outputs.close()


def test_lock_is_exclusive_and_released(tmp_path):
    first, second = FolderLock(tmp_path), FolderLock(tmp_path)
    first.acquire()
    with pytest.raises(FolderInUse, match=rf"process {os.getpid()} on "):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


class _OneRank:
    """A world of one rank (mx.distributed.init() here would start an MPI singleton)."""

    def size(self):
        return 1

    def rank(self):
        return 0


def test_stop_agreement_and_resume_command():
    stop = StopAgreement(_OneRank())
    assert not stop.agree() and stop.signum is None
    assert stop.agree(write_failed=True) and stop.write_failed
    stop.local = signal.SIGTERM
    assert stop.agree() and stop.signum == signal.SIGTERM and stop.ranks == {0: 15}
    argv = ["--iters", "8", "--resume-adapter-file", "a b/0000004_adapters.safetensors",
            "--adapter-path", "runs/x"]
    assert resume_command(argv, 2, "mpi") == ("python -m course_lib.mpi -np 2 python -m "
                                              "course_lib.fine_tune "
                                              "--iters 8 --adapter-path runs/x --resume")
    assert resume_command(["--resume"], 1, "none", resume=False) == \
        "python -m course_lib.fine_tune"


# ----------------------------------------------------------------------------- bad outputs

@pytest.mark.parametrize("case", ["is a file", "under a file"])
def test_output_path_that_is_a_file(tmp_path, tiny_model, case):
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    path = file if case == "is a file" else file / "run"
    proc = run(fine_tune_cmd(*ARGS, "--iters", "2", "--adapter-path", path), check=False)
    reason = ("File exists (it is a file, not a folder)" if case == "is a file" else
              "Not a directory (a part of the path is a file, not a folder)")
    assert proc.returncode == 5 and "Traceback" not in proc.stderr
    assert _error_lines(proc.stderr) == [f"error: cannot write {path}: {reason}. No checkpoint "
                                         "was written yet"]
    assert file.read_text() == "keep me\n" and os.listdir(tmp_path) == ["notes.txt"]


def test_data_cli_into_a_full_disk(tmpfs):
    """``course_lib.data`` writes its splits the same way: one line, old files kept."""
    disk = tmpfs("64k")
    (disk / "train.jsonl").write_text('{"text": "old"}\n')
    raw = REPO / "data-sets" / "raw" / "dolly-pirate-sample.jsonl"
    _fill(disk, leave=0)
    proc = run([PY, "-m", "course_lib.data", raw, disk], check=False)
    assert proc.returncode == 5 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"error: cannot write {disk}/train.jsonl: No space "
                                            "left on device (free some space)")
    assert (disk / "train.jsonl").read_text() == '{"text": "old"}\n'
    assert sorted(os.listdir(disk)) == ["ballast", "train.jsonl"]


@pytest.mark.distributed
def test_disk_full_during_a_checkpoint_save_stops_both_ranks(tmpfs, reference):
    disk = tmpfs("16m")
    out = disk / "run"
    run(mpirun(2, *fine_tune_cmd(*ARGS, "--iters", "6", "--adapter-path", out)))
    kept = {n: b for n, b in _snapshot(out).items() if n.startswith("0000006")}
    ballast = _fill(disk, leave=64 * 1024)  # config and metrics fit; a checkpoint does not

    tic = time.monotonic()
    proc = run(mpirun(2, *fine_tune_cmd(*ARGS, "--resume", "--adapter-path", out)),
               check=False, timeout=120)
    seconds = time.monotonic() - tic
    print(f"disk full: exit {proc.returncode} after {seconds:.1f} s: "
          f"{_error_lines(proc.stderr)}")
    assert proc.returncode == 5 and seconds < 60 and "Traceback" not in proc.stderr
    assert _error_lines(proc.stderr) == [(
        f"error: cannot write {out}/0000009_adapters.safetensors: No space left on device "
        f"(free some space). The checkpoint at iteration 6 in {out} is whole: continue with "
        "--resume once the folder can be written")]
    assert checkpoint.latest(out) == 6
    assert {n: b for n, b in _snapshot(out).items() if n.startswith("0000006")} == kept
    assert not [n for n in os.listdir(out) if n.startswith("0000009")]
    assert _temporaries(out) == []
    assert max(r["iteration"] for r in _records(out)) == 9  # nothing written after it

    ballast.unlink()  # space again: the run continues as if nothing happened
    run(mpirun(2, *fine_tune_cmd(*ARGS, "--resume", "--adapter-path", out)))
    _assert_equals_reference(out, reference)


@pytest.mark.distributed
def test_read_only_folder(tmpfs, tiny_model):
    disk = tmpfs("16m")
    out = disk / "run"
    run(fine_tune_cmd(*ARGS, "--iters", "3", "--adapter-path", out))
    before = _snapshot(out)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

    for path, extra in [(out, ["--resume"]), (disk / "new", [])]:
        tic = time.monotonic()
        proc = run(mpirun(2, *fine_tune_cmd(*ARGS, *extra, "--adapter-path", path)),
                   check=False, timeout=120)
        seconds = time.monotonic() - tic
        print(f"read-only: exit {proc.returncode} after {seconds:.1f} s: "
              f"{_error_lines(proc.stderr)}")
        assert proc.returncode == 5 and seconds < 60 and "Traceback" not in proc.stderr
        reason = "Read-only file system (the file system is mounted read-only)"
        kept = (f"The checkpoint at iteration 3 in {out} is whole: continue with --resume "
                "once the folder can be written" if path == out else
                "No checkpoint was written yet")
        assert _error_lines(proc.stderr) == [f"error: cannot write {path}: {reason}. {kept}"]
    assert _snapshot(out) == before and not (disk / "new").exists()


def test_permission_denied(tmp_path, tiny_model):
    """Root may write anywhere (CAP_DAC_OVERRIDE), so the run is started without that
    capability (``setpriv --bounding-set``), into a folder another user owns: EACCES, as
    for a user on a shared machine. (A run as ``nobody`` cannot even reach the venv's
    Python here, which lives under root's 0700 home.)"""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the capability")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)  # nobody's
    path = theirs / "run"
    proc = run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                *fine_tune_cmd(*ARGS, "--iters", "2", "--adapter-path", path)], check=False)
    print(f"permission denied: exit {proc.returncode}: {_error_lines(proc.stderr)}")
    assert proc.returncode == 5 and "Traceback" not in proc.stderr, proc.stderr
    assert _error_lines(proc.stderr) == [
        f"error: cannot write {path}: Permission denied (this user may not write there). "
        "No checkpoint was written yet"]
    assert os.listdir(theirs) == []


# ----------------------------------------------------------------------------- signals

def _resume_with_printed_command(stderr: str, out: Path):
    """Run the command the stopped run printed, as printed (``python`` is this Python)."""
    cmd = shlex.split(stderr.split("Continue with:\n", 1)[1].splitlines()[0])
    i = len(cmd) - 1 - cmd[::-1].index("python")  # the fine-tune's python
    assert cmd[i + 1:i + 3] == ["-m", "course_lib.fine_tune"] and cmd[-1] == "--resume"
    assert cmd[i + 3:-1] == [str(a) for a in fine_tune_cmd(*ARGS, "--adapter-path", out)[3:]]
    assert cmd[:i] in ([], ["python", "-m", "course_lib.mpi", "-np", "2"])
    return run([PY if word == "python" else word for word in cmd])


@pytest.mark.distributed
@pytest.mark.parametrize("signame,target", [("SIGINT", "mpirun"), ("SIGTERM", "mpirun"),
                                            ("SIGTERM", "rank 1")])
def test_signal_stops_both_ranks_with_a_checkpoint_and_a_resume_command(
        tmp_path, reference, signame, target):
    out = tmp_path / "run"
    proc = _start(mpirun(2, *fine_tune_cmd(*ARGS, "--adapter-path", out)))
    _wait_for_step(proc, out, 4)
    signum = getattr(signal, signame)
    if target == "mpirun":  # Ctrl-C in a terminal reaches scripts/mpirun.sh only
        proc.send_signal(signum)
    else:  # a scheduler that signals one rank only
        os.kill(_rank_pids(proc.pid)[1], signum)
    tic = time.monotonic()
    stdout, stderr, seconds = _finish(proc, tic)
    print(f"{signame} to {target}: exit {proc.returncode} after {seconds:.2f} s")
    assert proc.returncode == 128 + signum and seconds < STOP_BOUND_S
    assert "Traceback" not in stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("Stopped by")]
    assert len(stopped) == 1, stderr
    print(stopped[0])
    # scripts/mpirun.sh relays the signal through mpirun (as SIGUSR1/SIGUSR2) to both ranks
    # at about the same time; they report the signal it stands for
    step = int(stopped[0].split("after step ")[1].split()[0])
    ranks = ["rank 1"] if target == "rank 1" else ["rank 0", "rank 1", "rank 0, rank 1"]
    assert stopped[0] in [f"Stopped by {signame} on {r} after step {step} of 24: saved the "
                          f"checkpoint at iteration {step} in {out}. Continue with:"
                          for r in ranks]
    assert checkpoint.latest(out) == step and _temporaries(out) == []
    assert max(r["iteration"] for r in _records(out)) == step  # every finished step kept

    proc = _resume_with_printed_command(stderr, out)
    assert f"Resuming from the checkpoint at iteration {step}" in proc.stdout
    _assert_equals_reference(out, reference)


def test_ctrl_c_on_one_rank_then_twice(tmp_path, tiny_model):
    """One process in a terminal gets Ctrl-C itself: the first stops after the step with
    a checkpoint; a second one exits at once and leaves the last checkpoint whole."""
    out = tmp_path / "run"
    proc = _start(fine_tune_cmd(*ARGS, "--adapter-path", out))
    _wait_for_step(proc, out, 4)
    proc.send_signal(signal.SIGINT)
    stdout, stderr, seconds = _finish(proc, time.monotonic())
    print(f"Ctrl-C, one rank: exit {proc.returncode} after {seconds:.2f} s")
    assert proc.returncode == 130 and seconds < STOP_BOUND_S and "Traceback" not in stderr
    step = checkpoint.latest(out)
    assert (f"Stopped by SIGINT after step {step} of 24: saved the checkpoint at iteration "
            f"{step} in {out}. Continue with:\n  python -m course_lib.fine_tune ") in stderr

    proc = _start(fine_tune_cmd(*ARGS, "--resume", "--adapter-path", out))
    _wait_for_step(proc, out, step + 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    tic = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr, seconds = _finish(proc, tic)
    print(f"Ctrl-C twice: exit {proc.returncode} {seconds:.2f} s after the second")
    assert proc.returncode == 130 and seconds < 5 and "Traceback" not in stderr
    assert "second Ctrl-C: exiting now; the last complete checkpoint is whole" in stderr
    latest = checkpoint.latest(out)  # whole: it loads, and the run continues from it
    assert latest >= step
    proc = run(fine_tune_cmd(*ARGS, "--iters", str(latest + 1), "--resume",
                             "--adapter-path", out))
    assert f"Resuming from the checkpoint at iteration {latest}" in proc.stdout


# ----------------------------------------------------------------------------- one run a folder

@pytest.mark.distributed
def test_second_run_on_a_live_folder_is_refused_and_a_crash_frees_it(tmp_path, tiny_model):
    out = tmp_path / "run"
    first = _start(mpirun(2, *fine_tune_cmd(*ARGS, "--iters", "400", "--adapter-path", out)))
    _wait_for_step(first, out, 3)
    tic = time.monotonic()
    second = run(fine_tune_cmd(*ARGS, "--adapter-path", out), check=False)
    print(f"second run: exit {second.returncode} after {time.monotonic() - tic:.1f} s: "
          f"{_error_lines(second.stderr)}")
    holder = _rank_pids(first.pid)[0]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    [line] = _error_lines(second.stderr)
    assert line.startswith(f"error: --adapter-path {out} is in use by another fine-tune "
                           f"(process {holder} on ")
    assert line.endswith("); wait for it to end or stop it, or choose another --adapter-path")
    n = len(_records(out))
    _wait_for_step(first, out, max(r["iteration"] for r in _records(out)) + 1)
    assert len(_records(out)) > n  # the live run's metrics were not touched

    os.kill(holder, signal.SIGKILL)  # a crash: no clean-up code runs
    first.communicate(timeout=60)
    last = checkpoint.latest(out)
    proc = run(fine_tune_cmd(*ARGS, "--iters", str(last + 1), "--resume",
                             "--adapter-path", out))
    assert f"Resuming from the checkpoint at iteration {last}" in proc.stdout


# ----------------------------------------------------------------------------- soak

@pytest.mark.distributed
@pytest.mark.slow
def test_soak_kill_a_random_rank_again_and_again_then_resume(tmp_path, reference):
    """Four SIGKILLs of a random rank at a random moment (a step, a validation, a save, or
    a random time), each followed by a resume; the finished run equals the uninterrupted
    one. ``benchmarks/soak.py --cycles 20`` is the long version."""
    seed = int(os.environ.get("COURSE_SOAK_SEED", "0"))
    result = soak.soak(tmp_path / "run", reference, cycles=4, iters=24, seed=seed,
                       timeout=120)
    for r in result["cycles"]:
        print(r)
    kills = [r for r in result["cycles"] if r["killed"]]
    assert len(kills) >= 3 and all(r["returncode"] != 0 for r in kills)
    assert len({r["kind"] for r in kills}) >= 3  # steps, validations, saves, random times
    assert all(r["stop_s"] < STOP_BOUND_S for r in kills)
    assert result["cycles"][-1]["returncode"] == 0
    assert result["same_weight_names"]
    assert result["max_loss_rel_diff"] <= 1e-5 and result["max_weight_abs_diff"] <= 1e-5
