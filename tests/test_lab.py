"""The two-host lab (course_lib.lab): real SSH and MPI between two network namespaces,
with shaped links. The lab tests need root and Linux (CI has both) and skip elsewhere,
saying why; the cost-model tests (course_lib.traffic) run anywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from conftest import PY, REPO, fine_tune_cmd, json_objects, read_train_losses, run

from course_lib import lab as labmod
from course_lib import traffic
from course_lib.lab import ADDRESSES, HOSTNAMES, HOSTS, SHAPES, Lab, LabError
from course_lib.lab_experiments import run_shape_blocks
from course_lib.mpi import find_open_mpi

REASON = labmod.unavailable_reason()
needs_lab = pytest.mark.skipif(REASON is not None, reason=str(REASON))

# Short fine-tunes: per-step train losses (metrics.jsonl) of 1 rank and of 2 ranks.
FT_ARGS = ["--iters", "6", "--steps-per-report", "1", "--steps-per-eval", "1000",
           "--save-every", "1000", "--val-batches", "1"]


def _netns_inodes(lab: Lab) -> set[int]:
    return {os.stat(f"/run/netns/{lab.ns(h)}").st_ino for h in HOSTS}


def _processes_in(inodes: set[int]) -> list[int]:
    """PIDs of processes whose network namespace is one of ``inodes``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                link = os.readlink(entry / "ns" / "net")
            except OSError:
                continue
            if int(link[link.index("[") + 1:-1]) in inodes:
                found.append(int(entry.name))
    return found


def _listeners_root_ns() -> set[str]:
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[3] for line in out.splitlines() if len(line.split()) > 3}


def _assert_gone(lab: Lab, inodes: set[int], before: dict) -> None:
    """Nothing of ``lab`` is left: namespaces, processes in them, its folder, and the
    shared directories it made (/run/sshd, /run/netns) unless something else uses them."""
    assert lab.leftovers() == []
    assert not any(lab.ns(h) in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                               text=True).stdout for h in HOSTS)
    assert _processes_in(inodes) == []
    assert not lab.dir.exists()
    others = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if not others.strip():
        assert Path("/run/netns").exists() == before["netns"]
    if not subprocess.run(["pgrep", "-x", "sshd"], capture_output=True).stdout.strip():
        assert Path("/run/sshd").exists() == before["sshd"]


@pytest.fixture
def scratch():
    """A folder in the checkout, which both lab hosts see, as on a real cluster."""
    folder = REPO / "runs" / f"test_lab_{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _before() -> dict:
    return {"netns": Path("/run/netns").exists(), "sshd": Path("/run/sshd").exists()}


@needs_lab
@pytest.mark.distributed
@pytest.mark.slow
def test_fine_tune_across_two_hosts_over_ssh(tiny_model, scratch, tmp_path):
    """Up; sshd on the lab link only; key login both ways; the fine-tune on 2 ranks, one per
    host, via mpirun over SSH and via mlx.launch, equals 1 rank; the all-reduce traffic went
    over lab0; down leaves nothing."""
    before, root_listeners = _before(), _listeners_root_ns()
    lab = Lab(f"cltest{os.getpid()}")
    lab.up(log=lambda m: None)
    inodes = _netns_inodes(lab)
    try:
        status = lab.status()
        assert status["up"] and status["shape"] == "none"
        for host in HOSTS:  # each sshd listens on its lab address only, inside its namespace
            assert status["hosts"][host]["listening"] == [f"{ADDRESSES[host]}:22"]
        assert status["listening_outside_namespaces"] == []
        assert _listeners_root_ns() <= root_listeners  # nothing new listens outside
        # Passwordless SSH with the lab's key, as mpirun and mlx.launch use it.
        assert lab.run("b", *lab.ssh_command("a", "hostname")).stdout.strip() == HOSTNAMES["a"]
        assert Path(lab.hostfile).read_text().splitlines()[-2:] == [
            f"{ADDRESSES['a']} slots=1", f"{ADDRESSES['b']} slots=1"]

        # The doctor on host a with the lab's hostfile: over ssh, the Open MPI that mpirun
        # --prefix starts prted from is there on each host, found whatever the login PATH.
        doc = run(lab.host_command("a", PY, "-m", "course_lib.doctor", "--hostfile",
                                   lab.hostfile, cwd=REPO), env=lab.env(), check=False)
        mpi = find_open_mpi()
        for host in HOSTS:
            assert re.search(rf"^PASS  Open MPI on {re.escape(ADDRESSES[host])}: "
                             rf"{re.escape(mpi.version)} at {re.escape(str(mpi.prefix))} "
                             r"\(its ssh PATH: \S+; mpirun --prefix starts prted from there\)$",
                             doc.stdout, re.M), doc.stdout

        solo = tmp_path / "solo"
        run(fine_tune_cmd(*FT_ARGS, "--adapter-path", solo), timeout=300)
        expected = read_train_losses(solo)

        # mpirun --hostfile over SSH, both interface options naming lab0.
        duo = scratch / "mpi"
        counters = lab.counters("a")
        cmd = lab.mpirun_command(2, *fine_tune_cmd(*FT_ARGS, "--adapter-path", duo))
        assert cmd[cmd.index("btl_tcp_if_include") + 1] == "lab0"
        assert cmd[cmd.index("oob_tcp_if_include") + 1] == "lab0"
        run(cmd, env=lab.env(), timeout=300)
        after = lab.counters("a")
        summary = json.loads((duo / "summary.json").read_text())
        assert (summary["world_size"], summary["backend"]) == (2, "mpi")
        got = read_train_losses(duo)
        assert got.keys() == expected.keys()
        for it, loss in expected.items():
            assert got[it] == pytest.approx(loss, rel=1e-4), f"iteration {it}"
        # Every step all-reduces the LoRA gradients (4 bytes per trainable parameter):
        # each rank sends and receives at least that much per step, over lab0.
        volume = summary["iterations"] * summary["trainable_parameters"] * 4
        assert after["tx_bytes"] - counters["tx_bytes"] >= volume
        assert after["rx_bytes"] - counters["rx_bytes"] >= volume

        # mlx.launch --hostfile (ring backend), each rank on its own host.
        hello = json_objects(run(lab.mlx_launch_command(PY, "-m", "course_lib.distributed",
                                                        "hello"), env=lab.env()).stdout)
        assert sorted((r["rank"], r["host"], r["backend"], r["received"]) for r in hello) == [
            (0, HOSTNAMES["a"], "ring", 3.0), (1, HOSTNAMES["b"], "ring", 3.0)]
        ring = scratch / "ring"
        run(lab.mlx_launch_command(*fine_tune_cmd(*FT_ARGS, "--adapter-path", ring)),
            env=lab.env(), timeout=300)
        assert json.loads((ring / "summary.json").read_text())["backend"] == "ring"
        got = read_train_losses(ring)
        for it, loss in expected.items():
            assert got[it] == pytest.approx(loss, rel=1e-4), f"ring, iteration {it}"
    finally:
        lab.down(log=lambda m: None)
    _assert_gone(lab, inodes, before)


@needs_lab
@pytest.mark.distributed
@pytest.mark.slow
def test_link_shapes_set_bandwidth_and_step_time(tiny_model, scratch):
    """Over the wifi shape an all-reduce moves data at its nominal rate (within 30%), and a
    fine-tune's step grows by what the cost model predicts when the link changes from
    thunderbolt to wifi."""
    before = _before()
    lab = Lab(f"clshape{os.getpid()}")
    lab.up(shape="wifi", log=lambda m: None)
    inodes = _netns_inodes(lab)
    try:
        assert "tbf" in lab.qdiscs("a") and "tbf" in lab.qdiscs("b")
        nominal = SHAPES["wifi"].bits_per_second
        bandwidth = [PY, "-m", "course_lib.distributed", "bandwidth", "--sizes", "16MiB",
                     "--repeats", "3"]
        # The best of up to 5 runs (each the median of 3 all-reduces): other work on this
        # shared CPU can only slow a transfer down; the shaping is what caps it, in every run.
        measured, runs = {}, {}
        for name, cmd in [("mpirun", lab.mpirun_command(2, *bandwidth)),
                          ("mlx.launch", lab.mlx_launch_command(*bandwidth))]:
            runs[name] = []
            while len(runs[name]) < 5 and max(runs[name], default=0) < 0.7 * nominal:
                [row] = json_objects(run(cmd, env=lab.env(), timeout=120).stdout)
                runs[name].append(row["bus_gbps"] * 8e9)
            measured[name] = max(runs[name])
        for name in runs:
            assert 0.7 * nominal <= measured[name], (name, runs)
            assert all(r <= 1.3 * nominal for r in runs[name]), (name, runs)

        # One 2-rank run whose link alternates thunderbolt / wifi every 4 steps. A large
        # LoRA (r = 256, 13.5 MiB of gradients) in one bucketed all-reduce, on rows cut to
        # 64 tokens (all steps alike), so that the link's share of a step stands out from
        # the CPU's noise. A second run only when the first is off (a burst of other work
        # on this shared machine); both are reported when both are.
        shapes, block, cycles = ["thunderbolt", "wifi"], 4, 3
        out = scratch / "shapes"
        iters = 1 + block * cycles * len(shapes)
        cmd = lab.mpirun_command(2, *fine_tune_cmd(
            "--iters", iters, "--steps-per-report", "1", "--steps-per-eval", "1000",
            "--save-every", "1000", "--val-batches", "1", "--step-timing", "--lora-rank", "256",
            "--all-reduce", "bucketed", "--batch-size", "2", "--max-seq-length", "64",
            "--adapter-path", out))
        emulated = lab.status()["latency_emulated"]
        attempts = []
        for _ in range(2):
            steps = run_shape_blocks(lab, cmd, out / "metrics.jsonl", shapes, block, cycles,
                                     timeout=300)
            n_bytes = json.loads((out / "summary.json").read_text())["trainable_parameters"] * 4
            median = {s: statistics.median(r["seconds"] for r in steps[s]) for s in shapes}

            def model(s, bits_per_second, n_bytes=n_bytes):  # latency only where emulated
                return traffic.ring_all_reduce_seconds(
                    n_bytes, 2, bits_per_second, SHAPES[s].latency_seconds if emulated else 0)

            # The cost model with the bandwidth the wifi link delivered above (within 30% of
            # its nominal rate): the step grows by 2(N-1)/N x bytes / bandwidth.
            predicted = (model("wifi", measured["mpirun"])
                         - model("thunderbolt", SHAPES["thunderbolt"].bits_per_second))
            grown = median["wifi"] - median["thunderbolt"]
            attempts.append({"grown": grown, "predicted": predicted, "medians": median})
            if 0.65 * predicted <= grown <= 1.35 * predicted:
                break
        else:
            pytest.fail(f"step growth thunderbolt -> wifi off the cost model: {attempts}, "
                        f"wifi bandwidth {runs}")
    finally:
        lab.down(log=lambda m: None)
    _assert_gone(lab, inodes, before)


@needs_lab
def test_down_removes_a_half_built_lab(monkeypatch):
    """up fails after namespaces, link, keys and host a's sshd exist: it removes all of
    them; down on a lab that is not there does nothing."""
    before = _before()
    lab = Lab(f"clhalf{os.getpid()}")
    start = Lab._start_sshd

    def start_then_fail(self, host):
        if host == "b":
            raise LabError("injected failure starting host b's sshd")
        start(self, host)

    monkeypatch.setattr(Lab, "_start_sshd", start_then_fail)
    with pytest.raises(LabError, match="injected failure"):
        lab.up(log=lambda m: None)
    assert lab.leftovers() == [] and not lab.dir.exists()
    assert lab.down(log=lambda m: None) == []
    others = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if not others.strip():
        assert Path("/run/netns").exists() == before["netns"]


def test_cost_model_ring_all_reduce():
    # 2 machines: each sends and receives the whole payload once, plus 2 latencies.
    assert traffic.ring_all_reduce_seconds(1e6, 2, 8e9, 1e-3) == pytest.approx(1e-3 + 2e-3)
    # N machines: 2(N-1)/N of the payload, 2(N-1) latencies per call.
    assert traffic.ring_all_reduce_seconds(4e6, 4, 8e9, 1e-4, calls=3) == pytest.approx(
        1.5 * 4e6 / 1e9 + 6 * 1e-4 * 3)
    assert traffic.ring_all_reduce_seconds(1e9, 1, 1e9, 1.0) == 0.0
    step = traffic.predicted_step_seconds(4, 0.8, 0.01, 4e6, 8e9, 1e-4, calls=3)
    assert step == pytest.approx(0.2 + 0.01 + traffic.ring_all_reduce_seconds(4e6, 4, 8e9, 1e-4, 3))


def test_shapes_are_cited_and_ordered():
    assert list(SHAPES) == ["thunderbolt", "ethernet-1g", "wifi"]
    rates = [s.bits_per_second for s in SHAPES.values()]
    latencies = [s.latency_seconds for s in SHAPES.values()]
    assert rates == sorted(rates, reverse=True) and latencies == sorted(latencies)
    assert all(s.source and s.stands_for for s in SHAPES.values())


def test_lab_cli_check_says_whether_it_can_run():
    before = _before()
    proc = subprocess.run([PY, "-m", "course_lib.lab", "check"], capture_output=True,
                          text=True, timeout=60)
    if REASON is None:
        assert proc.returncode == 0 and "can run here" in proc.stdout
        # Its netem probe (a throw-away namespace) leaves nothing either.
        others = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        if not others.strip():
            assert Path("/run/netns").exists() == before["netns"]
    else:
        assert proc.returncode == 1 and proc.stdout.strip() == REASON
