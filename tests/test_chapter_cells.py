"""Chapter cells run outside Jupyter on other weights than the ones their stored outputs
were made with.

The chapters store outputs for float32 weights (``smollm2:float32``), but on a Mac the
course's model loads 4-bit by default (``smollm2:4bit``), and a learner may point a cell at
it. Here chapter 4's "LoRA, from scratch" cell runs, read from the notebook as it is, on the
4-bit model: a quantized layer's ``weight`` packs ``32 // bits`` weights into each
``uint32``, so reading the input size from its shape alone gives 72 for 576 inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from conftest import REPO

CHAPTER_4 = REPO / "notebooks" / "04_distributed_lora.ipynb"


def code_cells(notebook: Path) -> list[str]:
    """The source of every code cell of ``notebook``, in order."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def the_cell(cells: list[str], marker: str) -> int:
    """The index of the one code cell that contains ``marker``."""
    found = [i for i, source in enumerate(cells) if marker in source]
    assert len(found) == 1, f"{len(found)} code cells contain {marker!r}"
    return found[0]


def run_lora_from_scratch(notebook: Path, model_name: str) -> tuple[dict, str]:
    """Chapter 4's set-up cell (imports, ``MODEL``) with ``model_name`` in place of the
    chapter's model, the two lines of its first ``load(MODEL)`` cell that load the model
    (not its timed generation), then the "LoRA, from scratch" cell. Returns the namespace
    and what the cells printed."""
    cells = code_cells(notebook)
    setup = cells[the_cell(cells, "MODEL = models.resolve(")]
    setup, n = re.subn(r'models\.resolve\("[^"]*"\)', f"models.resolve({model_name!r})", setup)
    assert n == 1, "the set-up cell names its model once"
    lora = the_cell(cells, "class LoRA(nn.Module)")
    loads = [i for i, source in enumerate(cells[:lora]) if "load(MODEL)" in source]
    assert loads, "a cell before the LoRA cell loads the model"
    loading = "\n".join(line for line in cells[loads[0]].splitlines()
                        if line.startswith("from mlx_lm import") or "= load(MODEL)" in line)
    namespace: dict = {"__name__": "chapter_4"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for name, source in [("set-up", setup), ("load", loading), ("LoRA", cells[lora])]:
            try:
                exec(compile(source, f"<{notebook.name}: {name} cell>", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"{notebook.name}'s {name} cell on {model_name}: "
                            f"{type(e).__name__}: {e}\nprinted:\n{printed.getvalue()}")
    return namespace, printed.getvalue()


@pytest.mark.slow
def test_chapter_4_lora_from_scratch_on_4bit_weights(monkeypatch):
    import mlx.core as mx
    import mlx.nn as nn

    monkeypatch.chdir(REPO / "notebooks")  # the cells' relative paths, as in Jupyter
    ns, printed = run_lora_from_scratch(CHAPTER_4, "smollm2:4bit")

    base = ns["q_proj"]
    assert isinstance(base, nn.QuantizedLinear), "the 4-bit model's layers are quantized"
    assert base.weight.shape == (576, 576 * base.bits // 32)  # packed: 72 uint32 per row
    # The cell's own checks, as it prints them...
    assert "at the start, LoRA changes nothing: True" in printed, printed
    assert "ours equals mlx_lm's LoRALinear: True" in printed, printed
    assert "trainable in ours: ['A', 'B']" in printed, printed
    # ...and the same facts from its objects: A is r x d_in with the layer's real d_in.
    ours, theirs, x = ns["ours"], ns["theirs"], ns["x"]
    assert ours.A.shape == (8, 576) and ours.B.shape == (576, 8)
    assert theirs.lora_a.shape == (576, 8)
    assert mx.allclose(ours(x), theirs(x), atol=1e-5).item()
