"""Checkpoints that continue a fine-tune exactly, written so a crash never corrupts one.

A checkpoint at iteration ``N`` in the adapter folder is three files:

- ``000000N_adapters.safetensors``: the trainable weights (what ``mlx_lm`` loads);
- ``000000N_optimizer.safetensors``: the optimizer state (Adam's moments and step);
- ``000000N_state.json``: the iteration, the data order's random state and position, and
  the run's settings. (MLX's own random state needs no saving: the loop reseeds it from the
  seed and the iteration at every step, so dropout masks do not depend on history.)

Each file is written to a temporary name and renamed (:mod:`course_lib.atomic`), and
``state.json`` is written last: a checkpoint counts as complete only when its state file
exists, so a process killed in the middle of a save leaves the previous checkpoint as the
latest complete one. A save that fails (disk full, read-only) removes what it wrote of its
own checkpoint and raises :class:`course_lib.atomic.WriteError`.

On resume, rank 0 reads the checkpoint and sends it to the other ranks with all-reduces
(the others contribute zeros), so only rank 0's machine needs the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from course_lib import atomic, fault_injection
from course_lib.distributed import broadcast, broadcast_json

CHECKPOINT = re.compile(r"^(\d{7})_state\.json$")


def paths(folder: Path, iteration: int) -> dict[str, Path]:
    """The three files of the checkpoint at ``iteration``."""
    stem = Path(folder) / f"{iteration:07d}"
    return {"adapters": Path(f"{stem}_adapters.safetensors"),
            "optimizer": Path(f"{stem}_optimizer.safetensors"),
            "state": Path(f"{stem}_state.json")}


def save(folder: Path, iteration: int, model, optimizer, state: dict) -> Path:
    """Write the checkpoint at ``iteration`` (rank 0 only); returns its adapters file.

    ``state`` holds what else continuing needs (data order, settings); the iteration is
    added here. When a file cannot be written (disk full, read-only...), the files this
    save wrote are removed again (with a state file of the same iteration left from an
    earlier run, which would now describe other weights; other checkpoints are not
    touched) and :class:`course_lib.atomic.WriteError` names the file and the reason.
    """
    p = paths(folder, iteration)
    written = []
    try:
        atomic.save_safetensors(p["adapters"], dict(tree_flatten(model.trainable_parameters())))
        written.append(p["adapters"])
        fault_injection.in_save(iteration)
        atomic.save_safetensors(p["optimizer"], dict(tree_flatten(optimizer.state)))
        written.append(p["optimizer"])
        atomic.write_json(p["state"], {**state, "iteration": iteration})
    except atomic.WriteError:
        if written:  # a state file left from before would now describe other weights
            for f in (p["state"], *written):
                with contextlib.suppress(OSError):
                    f.unlink()
        raise
    return p["adapters"]


def latest(folder: Path) -> int | None:
    """Iteration of the newest complete checkpoint in ``folder`` (state file and both weight
    files present), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for f in folder.iterdir():
        m = CHECKPOINT.match(f.name)
        if m and all(p.is_file() for p in paths(folder, int(m.group(1))).values()):
            found.append(int(m.group(1)))
    return max(found, default=None)


def iteration_of(adapter_file: str | Path) -> int | None:
    """``N`` when ``adapter_file`` is a checkpoint's ``000000N_adapters.safetensors`` whose
    state file exists beside it; None for a plain adapter file."""
    m = re.match(r"^(\d{7})_adapters\.safetensors$", Path(adapter_file).name)
    if not m:
        return None
    n = int(m.group(1))
    return n if paths(Path(adapter_file).parent, n)["state"].is_file() else None


def fingerprint(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file: ties a checkpoint to its training data."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def mismatches(saved: dict, current: dict) -> list[str]:
    """Settings that differ between a checkpoint and this run, as ``name: saved -> now``."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def broadcast_arrays(arrays: dict, template: dict, group) -> dict:
    """Rank 0's ``arrays`` on every rank; other ranks pass ``{}`` and get arrays shaped like
    ``template`` (same keys; its values arrays or anything with ``.shape`` and ``.dtype``)
    filled from rank 0.

    Raises ``ValueError`` on every rank when rank 0's ``arrays`` lack a key of ``template``.
    """
    if group.size() == 1:
        return arrays
    missing = broadcast_json(sorted(set(template) - set(arrays)) if group.rank() == 0 else None,
                             group)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} arrays the run needs "
                         f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    # Every rank walks the template's keys in the same order: collectives pair up by call
    # order, and a file's key order need not be the template's. The template's entries are
    # arrays or templates (``.shape``, ``.dtype``; a sharded run's whole arrays): the other
    # ranks send zeros of those shapes.
    mine = {k: arrays[k] if group.rank() == 0 else mx.zeros(v.shape, v.dtype)
            for k, v in template.items()}
    out = broadcast(mine, group)
    mx.eval(out)
    return out


def read_state(folder: Path, iteration: int, group) -> dict:
    """The state file of a checkpoint, read on rank 0 and sent to every rank."""
    rank0 = group.rank() == 0
    return broadcast_json(json.loads(paths(folder, iteration)["state"].read_text())
                          if rank0 else None, group)


def restore(folder: Path, iteration: int, model, optimizer, group, sharding=None) -> None:
    """Load a checkpoint's weights and optimizer state on every rank (read on rank 0,
    broadcast to the others).

    ``optimizer`` must have been initialised (``optimizer.init(...)``) so its state has the
    right structure on every rank. A checkpoint holds whole arrays; under ``sharding`` (a
    :class:`course_lib.fine_tune.sharding.Sharding`) each rank keeps its pieces of them.
    """
    p = paths(folder, iteration)
    rank0 = group.rank() == 0
    sharded = sharding is not None and sharding.sharded
    trainable = dict(tree_flatten(model.trainable_parameters()))
    opt_template = dict(tree_flatten(optimizer.state))
    if sharded:
        trainable, opt_template = sharding.whole_like(trainable), sharding.whole_like(
            opt_template)
    weights = broadcast_arrays(mx.load(str(p["adapters"])) if rank0 else {}, trainable, group)
    opt = broadcast_arrays(mx.load(str(p["optimizer"])) if rank0 else {}, opt_template, group)
    if sharded:
        weights, opt = sharding.local(weights), sharding.local(opt)
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt.items()))
    mx.eval(model.parameters(), optimizer.state)
