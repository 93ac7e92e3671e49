"""The course's pictures (course_lib.diagrams, plotting.plot_sharding_layout) draw what they
claim: the ring's steps and sends, FSDP's collectives, the lab's real names and shapes,
matrices to scale."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from course_lib import diagrams, plotting  # noqa: E402
from course_lib.lab_shapes import SHAPES  # noqa: E402
from course_lib.lab_system import ADDRESSES, HOSTNAMES, INTERFACE, LabError  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def gids(ax, gid) -> list:
    return [p for p in ax.patches if p.get_gid() == gid]


# ----------------------------------------------------------------------- ring all-reduce

@pytest.mark.parametrize("n", [3, 4])
def test_ring_has_a_panel_per_step_and_n_sends_in_each(n):
    fig = diagrams.ring_all_reduce(n)
    assert len(fig.axes) == 2 * (n - 1) + 2
    sends = [len(gids(ax, "send")) for ax in fig.axes]
    assert sends == [0] + [n] * (2 * (n - 1)) + [0]
    assert all(len(gids(ax, "chunk")) == n * n for ax in fig.axes)
    title = fig._suptitle.get_text()
    assert "2(N-1)/N" in title and f"{2 * (n - 1)}/{n}" in title
    assert f"2(N-1) = {2 * (n - 1)} steps" in title


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_ring_steps_reduce_scatter_then_all_gather_the_sum(n):
    steps = diagrams.ring_steps(n)
    phases = [s["phase"] for s in steps]
    assert phases == ["start"] + ["reduce-scatter"] * (n - 1) + ["all-gather"] * (n - 1) + ["end"]
    # After the reduce-scatter each rank holds exactly one chunk summed over all ranks.
    after_rs = steps[n - 1]["state"]
    for r in range(n):
        full = [c for c in range(n) if sorted(after_rs[r][c]) == list(range(n))]
        assert full == [(r + 1) % n]
    # At the end every rank holds every chunk summed over all ranks, each rank once.
    assert all(sorted(h) == list(range(n)) for row in steps[-1]["state"] for h in row)
    # Each rank sends 2(N-1) chunks (1/N of the buffer each), always to the next rank.
    for r in range(n):
        mine = [(c, dst) for s in steps for src, c, dst in s["sends"] if src == r]
        assert len(mine) == 2 * (n - 1)
        assert {dst for _, dst in mine} == {(r + 1) % n}


def test_ring_labels_partial_sums_and_rejects_unreadable_sizes():
    fig = diagrams.ring_all_reduce(3)
    text = texts(fig)
    assert "a0+a1" in text and "Σa" in text and "Patarasuk and Yuan 2009" in text
    with pytest.raises(ValueError):
        diagrams.ring_all_reduce(1)
    with pytest.raises(ValueError):
        diagrams.ring_all_reduce(6)


def test_ring_png_is_saved_and_the_same_every_time(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    diagrams.ring_all_reduce(3, out=a)
    diagrams.ring_all_reduce(3, out=b)
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------- FSDP timeline

@pytest.mark.parametrize("blocks", [2, 4])
def test_fsdp_gathers_twice_per_block_and_reduce_scatters_once(blocks):
    fig = diagrams.fsdp_timeline(blocks)
    lanes = fig.axes[0]
    assert len(gids(lanes, "all-gather")) == 2 * blocks
    assert len(gids(lanes, "reduce-scatter")) == blocks
    assert len(gids(lanes, "forward")) == blocks
    assert len(gids(lanes, "backward")) == blocks
    assert len(gids(lanes, "optimizer")) == 1
    assert gids(lanes, "recompute") == []  # the backward does not redo the forward
    assert "does not recompute" in texts(fig)
    assert f"{2 * blocks} all-gathers, {blocks} reduce-scatters" in texts(fig)


def test_fsdp_events_order_and_memory():
    events, held = diagrams.fsdp_events(3)
    computed = [(e["kind"], e["block"]) for e in events if e["lane"] == "computation"]
    assert computed == [("forward", 1), ("forward", 2), ("forward", 3), ("backward", 3),
                        ("backward", 2), ("backward", 1), ("optimizer", None)]
    # Events follow one another; each block is gathered before it computes.
    for a, b in zip(events, events[1:]):
        assert b["start"] == pytest.approx(a["start"] + a["seconds"])
    # One block's whole weights at a time; each gradient held until its reduce-scatter ends.
    weights = sorted((h["start"], h["end"]) for h in held if h["kind"] == "weights")
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(weights, weights[1:]))
    for e in events:
        if e["kind"] == "reduce-scatter":
            grads = [h for h in held if h["kind"] == "gradient" and h["block"] == e["block"]]
            assert max(h["end"] for h in grads) == pytest.approx(e["start"] + e["seconds"])


def test_fsdp_recompute_draws_a_forward_before_each_backward():
    fig = diagrams.fsdp_timeline(3, recompute=True)
    lanes = fig.axes[0]
    assert len(gids(lanes, "recompute")) == 3
    assert len(gids(lanes, "all-gather")) == 6


# ----------------------------------------------------------------------- the lab

@pytest.mark.parametrize("link", [*SHAPES, "none"])
def test_lab_topology_names_the_hosts_addresses_and_the_shape(link):
    fig = diagrams.lab_topology(link)
    text = texts(fig)
    for h in ("a", "b"):
        assert f"host {h}: {HOSTNAMES[h]}" in text
        assert ADDRESSES[h] in text
        assert f"course-lab-{h}" in text
    assert INTERFACE in text and "veth" in text and "mpirun" in text and "sshd" in text
    # Every shape of lab_shapes is listed with its rate (the drawn one too).
    for s in SHAPES.values():
        bps = s.bits_per_second
        rate = f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"
        assert rate in text and s.stands_for in text
    if link != "none":
        assert f"tbf {diagrams.rate_text(SHAPES[link].bits_per_second)}" in text


def test_lab_topology_rejects_an_unknown_shape():
    with pytest.raises(LabError):
        diagrams.lab_topology("carrier-pigeon")


# ----------------------------------------------------------------------- sharding layout

SMOLLM2 = {"model.embed_tokens.weight": [49152, 576],
           "model.layers.0.self_attn.q_proj.weight": [576, 576],
           "model.layers.0.self_attn.k_proj.weight": [192, 576],
           "model.layers.0.self_attn.v_proj.weight": [192, 576],
           "model.layers.0.self_attn.o_proj.weight": [576, 576],
           "model.layers.0.mlp.gate_proj.weight": [1536, 576],
           "model.layers.0.mlp.down_proj.weight": [576, 1536],
           "model.layers.0.mlp.up_proj.weight": [1536, 576],
           "model.layers.0.input_layernorm.weight": [576],
           "model.norm.weight": [576]}
NAMES = {"embed_tokens": "embedding", "q_proj": "q", "k_proj": "k", "v_proj": "v",
         "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def layout(axis_of, shapes=SMOLLM2):
    return [{"path": p, "shape": s, "whole": s, "axis": axis_of(p)} for p, s in shapes.items()]


def tensor_axis(path):
    if "gate_proj" in path or "up_proj" in path:
        return 0
    return -1 if "down_proj" in path else None


LAYOUTS = {"none": layout(lambda p: None), "fsdp": layout(lambda p: 0),
           "tensor": layout(tensor_axis)}


def areas(fig) -> dict:
    """``{(label, matrix, part): area}`` summed over the figure's rectangles."""
    out = {}
    for ax in fig.axes:
        for p in ax.patches:
            gid = p.get_gid() or ""
            if isinstance(p, Rectangle) and gid.count("|") == 2:
                key = tuple(gid.split("|"))
                out[key] = out.get(key, 0.0) + p.get_width() * p.get_height()
    return out


@pytest.mark.parametrize("ranks", [2, 4])
def test_layout_is_drawn_to_scale(ranks):
    fig = plotting.plot_sharding_layout(LAYOUTS, ranks=ranks)
    drawn = areas(fig)
    sizes = {NAMES[p.split(".")[-2]]: math.prod(s) for p, s in SMOLLM2.items()
             if len(s) == 2}
    for label in LAYOUTS:
        for name, size in sizes.items():
            # The outline's area is the matrix's rows x columns, in every mode.
            assert drawn[(label, name, "outline")] == pytest.approx(size)
            parts = {k[2]: a for k, a in drawn.items() if k[:2] == (label, name)}
            held = [a for part, a in parts.items() if part.startswith("rank ")]
            if label == "none" or (label == "tensor" and name not in ("gate", "up", "down")):
                assert parts["whole"] == pytest.approx(size) and held == []
            else:  # cut into equal pieces, one per rank
                assert len(held) == ranks
                assert held == pytest.approx([size / ranks] * ranks)
    # One scale for every panel, the same across and up: a data unit is as many pixels
    # in x as in y, and as many in every panel.
    fig.canvas.draw()
    scales = []
    for ax in fig.axes:
        (x0, y0), (x1, y1) = ax.transData.transform([(0, 0), (1000, 1000)])
        scales += [x1 - x0, y1 - y0]
    assert max(scales) == pytest.approx(min(scales), rel=1e-3)


def test_layout_says_how_much_bigger_the_embedding_is(tmp_path):
    fig = plotting.plot_sharding_layout(LAYOUTS, out=tmp_path / "layout.png")
    block = sum(math.prod(s) for p, s in SMOLLM2.items() if ".layers." in p and len(s) == 2)
    ratio = 49152 * 576 / block
    assert f"{ratio:.1f}x the parameters of the block's 7 matrices" in texts(fig)
    assert "to scale" in texts(fig)
    assert (tmp_path / "layout.png").stat().st_size > 0
