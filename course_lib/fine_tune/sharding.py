"""``--sharding none | fsdp | tensor``: what each rank holds, and how the gradients meet.

- ``none``: data parallelism. Every rank holds the whole model, its gradients and Adam's
  two moments (4 + 4 + 8 = 16 bytes per trained float32 parameter) and takes 1/N of the
  global batch; the gradients are all-reduced (:mod:`course_lib.fine_tune.step`).
- ``fsdp``: fully sharded data parallelism, ZeRO stage 3 (Rajbhandari et al. 2020, "ZeRO:
  Memory Optimizations Toward Training Trillion Parameter Models"; PyTorch FSDP, Zhao et
  al. 2023). Every parameter is cut along axis 0 into N pieces and each rank keeps one,
  with its gradient and Adam moments: 16/N bytes per parameter. Each rank still takes 1/N
  of the batch. A *unit* (a transformer block, the embedding, the final norm) gathers its
  whole parameters just before it runs (all-gather) and frees them after; the backward
  pass gathers them again and reduce-scatters the gradients, so each rank receives the
  sum over ranks of its own piece only.
- ``tensor``: tensor parallelism as in Megatron-LM (Shoeybi et al. 2019, "Megatron-LM:
  Training Multi-Billion Parameter Language Models Using Model Parallelism"), in the
  layout of ``mlx_lm``'s llama ``Model.shard``: q/k/v and the MLP's gate/up projections
  are split by output (``shard_linear(..., "all-to-sharded")``), o and down by input
  (``"sharded-to-all"``, which all-sums its output). Every rank computes the same whole
  batch on its share of the heads and of the MLP width; the embedding and the norms are
  whole on every rank (as in ``Model.shard``).

What is MLX's and what is ours, and why:

- ``tensor`` uses MLX's ``shard_linear`` layers. It does not call ``Model.shard`` itself,
  for two reasons: LoRA layers wrap the linears (``shard_linear`` accepts only a plain or
  quantized linear), and ``Model.shard`` divides the heads without checking: SmolLM2 has
  9 query and 3 key-value heads, which 2 ranks cannot split, so there the attention stays
  whole on every rank and only the MLP is split (said in the run's log). LoRA's matrices
  are split to match their layer (:class:`ColumnLoRALinear`, :class:`RowLoRALinear`).
- ``fsdp`` does not use ``mlx.nn.fully_shard``. On this machine's backends it cannot run:
  its backward pass calls ``mx.distributed.sum_scatter``, which MLX 0.32 implements only
  for NCCL (``[mpi] sum_scatter not yet implemented``; the ring backend has none either).
  Two more things stand in the way of a fine-tune that ``mlx_lm`` can load: the wrapper
  moves every parameter under ``.module.`` (so saved names no longer match the model's),
  and it hides the wrapped block's attributes (``mlx_lm`` reads ``layer.use_sliding``).
  And in MLX's lazy graph a gathered parameter stays alive as long as the backward pass
  needs it, so ``fully_shard`` holds every unit's whole parameters at the peak: the
  memory FSDP exists to save (measured once, chapter 6's SmolLM2 run at 2 ranks with
  ``mx.checkpoint`` disabled: 1.54 GB per rank, against 1.05 GB with it and 1.69 GB for
  data parallelism). So here each unit's call is wrapped in ``mx.checkpoint``:
  the backward pass recomputes the unit's forward, gathering its parameters again
  (PyTorch FSDP's re-gather), at the cost of that extra forward pass. The unit keeps its
  class (a subclass is swapped in) and its parameter names, so checkpoints and adapters
  are ``mlx_lm``'s format. The reduce-scatter is ``mx.distributed.sum_scatter`` where
  the backend has it (probed once), else an ``all_sum`` whose result each rank slices:
  the same numbers, with twice the bytes of a real reduce-scatter (an all-reduce *is* a
  reduce-scatter followed by an all-gather) and a transient whole-size gradient per unit.

Checkpoints and adapters are gathered whole on rank 0 (:meth:`Sharding.whole`), so they
are the files an unsharded run writes (``mlx_lm`` loads them); resuming slices them again
(:meth:`Sharding.local`). The mode is not among a checkpoint's settings: every mode
computes the same update, up to float rounding.
"""

from __future__ import annotations

import math
import re
import types
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from course_lib import distributed as dist
from course_lib.fine_tune.errors import UsageError
from course_lib.traffic import CollectiveCounter

MODES = ("none", "fsdp", "tensor")
# The llama/mistral layout (mlx_lm/models/llama.py, Model.shard).
COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
          "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


# ------------------------------------------------------------------------- the plan

class Sharding:
    """How a model is split across the ranks of ``group``: made by :func:`shard_model`.

    ``axes`` maps a parameter's path (``model.layers.0.mlp.up_proj.weight``) to the axis
    it is cut along, rank r holding the r-th of N equal pieces; a path not in it is whole
    on every rank. ``notes`` are lines for the run's log. ``traffic`` counts the bytes of
    the collectives the steps build (:class:`course_lib.traffic.CollectiveCounter`).
    """

    def __init__(self, mode: str, group, axes: dict | None = None,
                 reduce_scatter: str | None = None, notes: list[str] | None = None):
        self.mode, self.group = mode, group
        self.axes = axes or {}
        self.reduce_scatter = reduce_scatter
        self.notes = notes or []
        self.traffic = CollectiveCounter()

    @property
    def sharded(self) -> bool:
        return self.mode != "none"

    def data_share(self) -> tuple[int, int]:
        """``(rank, size)`` to take this rank's share of a global batch with: the whole
        batch on every rank under ``tensor`` (``(0, 1)``), else 1/N of it."""
        if self.mode == "tensor":
            return 0, 1
        return self.group.rank(), self.group.size()

    def replicas(self) -> int:
        """How many ranks hold each row of the batch (N under ``tensor``, else 1): the
        loop divides summed token counts by it."""
        return self.group.size() if self.mode == "tensor" else 1

    def axis_of(self, path: str) -> int | None:
        """The axis the array at ``path`` is cut along (a parameter, or an optimizer
        state entry such as ``...weight.m``), or None when it is whole."""
        if path in self.axes:
            return self.axes[path]
        return self.axes.get(path.rpartition(".")[0])

    def finish_gradients(self, grad_sum, ntoks):
        """The step's gradient from this rank's token-summed gradients ``grad_sum`` and
        token count ``ntoks`` (int32 scalar), for ``fsdp`` and ``tensor``.

        ``fsdp``: the sharded parameters' gradients were already summed over the ranks by
        the reduce-scatter in the backward pass; any whole parameter's are all-summed
        here; all are divided by the global token count (one small ``all_sum``).
        ``tensor``: every rank computed the whole batch, so its gradients are complete:
        divided by its token count. A step that scores no token (prompts cut by
        ``--max-seq-length``) divides its zero gradients by 1, not 0."""
        if self.mode == "tensor":
            total = mx.maximum(ntoks, 1).astype(mx.float32)
            return tree_map(lambda g: g / total, grad_sum)
        total = mx.maximum(dist.all_sum(ntoks.astype(mx.float32), self.group), 1.0)
        flat = [(k, g if self.axis_of(k) is not None else dist.all_sum(g, self.group))
                for k, g in tree_flatten(grad_sum)]
        return tree_unflatten([(k, g / total) for k, g in flat])

    # --- whole arrays for files, and this rank's pieces of them

    def gather(self, path: str, x: mx.array) -> mx.array:
        """The whole array of which ``x`` is this rank's piece (collective: every rank
        calls it, in the same order)."""
        axis = self.axis_of(path)
        if axis is None:
            return x
        axis %= x.ndim
        whole = mx.distributed.all_gather(mx.moveaxis(x, axis, 0), group=self.group)
        return mx.moveaxis(whole, 0, axis)

    def whole(self, model, optimizer=None):
        """``(model_view, optimizer_view)`` whose ``trainable_parameters()`` and ``state``
        are the whole arrays on rank 0 (what :mod:`course_lib.checkpoint` and ``Outputs``
        save; empty on the other ranks, which write nothing); ``model, optimizer``
        themselves when nothing is sharded. Every rank must call it (the arrays are
        all-gathered, one at a time). Rank 0 then holds the whole trainable arrays (and,
        for a checkpoint, Adam's moments) until they are written: the price of saving in
        ``mlx_lm``'s one-file format."""
        if not self.sharded:
            return model, optimizer
        keep = self.group.rank() == 0

        def gathered(tree):
            out = []
            for k, v in tree_flatten(tree):
                v = self.gather(k, v)
                mx.eval(v)
                if keep:
                    out.append((k, v))
            return tree_unflatten(out) if out else {}
        params = gathered(model.trainable_parameters())
        view = types.SimpleNamespace(trainable_parameters=lambda: params)
        opt = None if optimizer is None else types.SimpleNamespace(
            state=gathered(optimizer.state))
        return view, opt

    def whole_like(self, flat: dict) -> dict:
        """Templates (``.shape``, ``.dtype``) of the whole arrays of this rank's ``flat``
        ``{path: array}``."""
        out = {}
        for k, v in flat.items():
            axis, shape = self.axis_of(k), list(v.shape)
            if axis is not None:
                shape[axis] *= self.group.size()
            out[k] = types.SimpleNamespace(shape=tuple(shape), dtype=v.dtype)
        return out

    def local(self, flat: dict) -> dict:
        """This rank's pieces of the whole arrays ``flat`` ``{path: array}``."""
        return {k: self.piece(v, self.axis_of(k)) for k, v in flat.items()}

    def piece(self, x: mx.array, axis: int | None) -> mx.array:
        """Rank r's r-th of N equal pieces of ``x`` along ``axis`` (``x`` when None)."""
        if axis is None or not self.sharded:
            return x
        n, r = self.group.size(), self.group.rank()
        size = x.shape[axis] // n
        index = [slice(None)] * x.ndim
        index[axis] = slice(r * size, (r + 1) * size)
        return mx.contiguous(x[tuple(index)])

    def holdings(self, model) -> list[dict]:
        """What this rank holds: per parameter ``{"path", "shape"`` (this rank's),
        ``"whole"`` (the model's), ``"axis"``, ``"trainable"}``."""
        trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
        rows = []
        for k, v in tree_flatten(model.parameters()):
            axis, whole = self.axis_of(k), list(v.shape)
            if axis is not None:
                whole[axis] *= self.group.size()
            rows.append({"path": k, "shape": list(v.shape), "whole": whole,
                         "axis": axis, "trainable": k in trainable})
        return rows

    def describe(self, model) -> dict:
        """For ``summary.json``: the mode, how gradients are reduce-scattered, and the
        parameters this rank holds (elements and float32-equivalent bytes) against the
        model's, and ``layout``: :meth:`holdings` of the parameters outside the blocks and
        of the first block (every block is split alike)."""
        rows = self.holdings(model)
        held = sum(math.prod(r["shape"]) for r in rows)
        whole = sum(math.prod(r["whole"]) for r in rows)
        held_t = sum(math.prod(r["shape"]) for r in rows if r["trainable"])
        whole_t = sum(math.prod(r["whole"]) for r in rows if r["trainable"])
        layout = [r for r in rows if _layer_index(r["path"]) in (None, 0)]
        return {"mode": self.mode, "reduce_scatter": self.reduce_scatter,
                "parameters_held": held, "parameters": whole,
                "trainable_held": held_t, "trainable": whole_t, "notes": self.notes,
                "layout": layout}


def _layer_index(path: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def shard_model(model, plan, group) -> Sharding:
    """Split ``model`` (loaded, adapters added) across ``group`` as ``plan.sharding``
    says, in place, then evaluate its parameters one at a time (so that a lazily loaded
    model never holds more than one whole array at once). Returns the :class:`Sharding`.

    Raises :class:`UsageError` before changing anything when a dimension does not divide
    by the world size, or the model is not of the llama/mistral layout ``tensor`` knows.
    """
    mode = plan.sharding
    if mode == "none":
        sharding = Sharding("none", group)
    elif mode == "fsdp":
        sharding = _shard_fsdp(model, group)
    else:
        sharding = _shard_tensor(model, group)
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    return sharding


# --------------------------------------------------------------------------- fsdp

def _has_sum_scatter(group) -> bool:
    """Whether this backend implements ``sum_scatter`` (MLX 0.32: NCCL only; MPI and
    the ring raise "not yet implemented" / "not supported" when it is evaluated)."""
    try:
        mx.eval(mx.distributed.sum_scatter(mx.zeros((group.size(),)), group=group))
        return True
    except RuntimeError:
        return False


def _reduce_scatter(group, native: bool):
    """``f(x)`` for ``x`` ``(N, M)`` on every rank: ``(M,)``, the sum over the ranks of row
    ``rank`` of their ``x``. ``sum_scatter`` when ``native``; else ``all_sum`` and this
    rank's row (the same numbers, twice the bytes)."""
    rank = group.rank()
    if native:
        return lambda x: mx.distributed.sum_scatter(x, group=group).reshape(-1)
    return lambda x: mx.distributed.all_sum(x, group=group)[rank]


def _gather_fn(group, shapes, reduce_scatter):
    """A differentiable all-gather of one unit's pieces (lists of arrays, whole
    ``shapes``), built as ``mlx.nn.fully_shard`` builds its own: the pieces are flattened
    into one buffer and gathered in one call; the vjp reduce-scatters the gradients."""
    n = group.size()
    sizes = [math.prod(s) // n for s in shapes]
    cuts = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]

    @mx.custom_function
    def gather(pieces):
        flat = mx.concatenate([p.reshape(-1) for p in pieces])
        whole = mx.distributed.all_gather(flat, group=group).reshape(n, -1)
        return [p.reshape(s) for p, s in zip(mx.split(whole, cuts, axis=1), shapes)]

    @gather.vjp
    def gather_vjp(pieces, cotangents, _):
        local = mx.concatenate([c.reshape(n, -1) for c in cotangents], axis=1)
        mine = reduce_scatter(local)
        return [m.reshape(p.shape) for m, p in zip(mx.split(mine, cuts), pieces)]

    return gather


class _UnitPlan:
    """One FSDP unit's parameter paths (trainable, then frozen) and its gathers."""

    def __init__(self, group, trainable: list, frozen: list, shapes: dict, reduce_scatter):
        self.group = group
        self.trainable, self.frozen = trainable, frozen
        self.gather_trainable = _gather_fn(group, [shapes[p] for p in trainable],
                                           reduce_scatter) if trainable else None
        self.frozen_shapes = [shapes[p] for p in frozen]

    def gather_frozen(self, pieces):
        """Whole frozen parameters from their pieces: a plain all-gather (no gradient)."""
        n = self.group.size()
        flat = mx.concatenate([p.reshape(-1) for p in pieces])
        whole = mx.stop_gradient(mx.distributed.all_gather(flat, group=self.group))
        whole = whole.reshape(n, -1)
        sizes = [math.prod(s) // n for s in self.frozen_shapes]
        cuts = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
        return [p.reshape(s) for p, s in zip(mx.split(whole, cuts, axis=1),
                                              self.frozen_shapes)]

    def call(self, module, method, args, kwargs):
        """``method(*args, **kwargs)`` with ``module``'s whole parameters in place,
        under ``mx.checkpoint`` so that the backward pass gathers them again instead of
        keeping them (see the module docstring)."""
        params = dict(tree_flatten(module.parameters()))
        pieces_t = [params[p] for p in self.trainable]
        pieces_f = [params[p] for p in self.frozen]
        live = [i for i, a in enumerate(args)
                if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)]
        paths = self.trainable + self.frozen

        def inner(trainable, *xs):
            whole = (self.gather_trainable(trainable) if trainable else []) + \
                (self.gather_frozen(pieces_f) if pieces_f else [])
            call_args = list(args)
            for i, x in zip(live, xs):
                call_args[i] = x
            module.update(tree_unflatten(list(zip(paths, whole))))
            try:
                return method(*call_args, **kwargs)
            finally:
                module.update(tree_unflatten(list(zip(paths, pieces_t + pieces_f))))

        if not pieces_t and not live:
            return inner([])
        return mx.checkpoint(inner)(pieces_t, *[args[i] for i in live])


class _FullyShardedUnit:
    """Mixed into a unit's class (see :func:`_fsdp_class`): its calls gather first."""

    def __call__(self, *args, **kwargs):
        return self._fsdp.call(self, super().__call__, args, kwargs)

    def as_linear(self, *args, **kwargs):  # a tied embedding used as the output layer
        return self._fsdp.call(self, super().as_linear, args, kwargs)


@lru_cache(maxsize=None)
def _fsdp_class(cls):
    """``cls`` with :class:`_FullyShardedUnit` in front: same attributes, same
    parameter names, and ``isinstance(unit, cls)`` still holds."""
    return type(f"FullySharded{cls.__name__}", (_FullyShardedUnit, cls), {})


def fsdp_units(model) -> list[tuple[str, nn.Module]]:
    """``[(path, module)]``: the FSDP units of a ``mlx_lm`` model: each transformer
    block, and every other child of ``model.model`` and of ``model`` (the embedding, the
    final norm, an untied ``lm_head``)."""
    layers = model.layers
    paths = {id(m): p for p, m in model.named_modules()}
    units = [(paths[id(layer)], layer) for layer in layers]
    trunk = getattr(model, "model", None)
    for parent, prefix in ((trunk, "model."), (model, "")):
        if not isinstance(parent, nn.Module):
            continue
        for name, child in parent.children().items():
            if isinstance(child, nn.Module) and child is not trunk:
                units.append((prefix + name, child))
    return units


def _shard_fsdp(model, group) -> Sharding:
    n = group.size()
    units = fsdp_units(model)
    for path, unit in units:  # check everything before changing anything
        for k, v in tree_flatten(unit.parameters()):
            if v.ndim == 0 or v.shape[0] % n:
                raise UsageError(f"--sharding fsdp cuts every parameter along its first axis: "
                                 f"{path}.{k} {tuple(v.shape)} does not divide by {n} ranks")
    native = _has_sum_scatter(group)
    reduce_scatter = _reduce_scatter(group, native)
    plan = Sharding("fsdp", group, reduce_scatter="sum_scatter" if native else
                    "all_sum + slice")
    for path, unit in units:
        flat = tree_flatten(unit.parameters())
        if not flat:
            continue
        trainable = {k for k, _ in tree_flatten(unit.trainable_parameters())}
        shapes = {k: v.shape for k, v in flat}
        unit.update(tree_unflatten([(k, plan.piece(v, 0)) for k, v in flat]))
        unit.__class__ = _fsdp_class(type(unit))
        unit._fsdp = _UnitPlan(group, [k for k, _ in flat if k in trainable],
                               [k for k, _ in flat if k not in trainable], shapes,
                               reduce_scatter)
        plan.axes.update({f"{path}.{k}": 0 for k, _ in flat})
    plan.notes.append(
        f"fsdp: {len(units)} units, every parameter cut in {n} along axis 0; gradients "
        "reduce-scattered with " + ("mx.distributed.sum_scatter" if native else
                                    "all_sum + slice (this backend has no sum_scatter: "
                                    "twice a reduce-scatter's bytes)"))
    return plan


# ------------------------------------------------------------------------- tensor

class ColumnLoRALinear(LoRALinear):
    """LoRA on an ``AllToShardedLinear`` (output split across ranks): ``lora_a``
    ``(input_dims, r)`` whole, ``lora_b`` ``(r, output_dims / N)`` this rank's columns.
    ``sum_gradients`` on ``x @ lora_a`` sums its gradient over the ranks (each holds part
    of the output), so ``lora_a`` and the input get the whole gradient on every rank."""

    def __call__(self, x):
        from mlx.nn.layers.distributed import sum_gradients

        y = self.linear(x)
        h = sum_gradients(self.linear.group)(self.dropout(x) @ self.lora_a)
        return y + (self.scale * (h @ self.lora_b)).astype(x.dtype)


class RowLoRALinear(LoRALinear):
    """LoRA on a ``ShardedToAllLinear`` (input split across ranks): ``lora_a``
    ``(input_dims / N, r)`` this rank's rows, ``lora_b`` ``(r, output_dims)`` whole.
    ``x @ lora_a`` is a partial sum, all-summed (``r`` numbers per token) before
    ``lora_b``, as the layer all-sums its own output."""

    def __call__(self, x):
        y = self.linear(x)
        h = mx.distributed.all_sum(self.dropout(x) @ self.lora_a, group=self.linear.group)
        return y + (self.scale * (h @ self.lora_b)).astype(x.dtype)


def _base_linear(m):
    return getattr(m, "linear", m)


def _tp_layer(m, kind: str, group, plan: Sharding, path: str):
    """The ``kind`` (``all-to-sharded`` / ``sharded-to-all``) split of layer ``m`` (a
    linear or mlx_lm's ``LoRALinear`` around one); records the parameters' axes."""
    from mlx.nn.layers.distributed import shard_linear

    column = kind == "all-to-sharded"
    base = _base_linear(m)
    frozen = not tree_flatten(base.trainable_parameters())
    sharded = shard_linear(base, kind, group=group)
    if frozen:
        sharded.freeze()
    prefix = path + (".linear" if isinstance(m, LoRALinear) else "")
    plan.axes[f"{prefix}.weight"] = 0 if column else -1
    if "bias" in sharded and column:
        plan.axes[f"{prefix}.bias"] = 0
    if not isinstance(m, LoRALinear):
        return sharded
    m.linear = sharded
    if column:
        m.lora_b = plan.piece(m.lora_b, 1)
        plan.axes[f"{path}.lora_b"] = 1
    else:
        m.lora_a = plan.piece(m.lora_a, 0)
        plan.axes[f"{path}.lora_a"] = 0
    m.__class__ = ColumnLoRALinear if column else RowLoRALinear
    return m


def _shard_tensor(model, group) -> Sharding:
    n = group.size()
    layers = model.layers
    paths = {id(m): p for p, m in model.named_modules()}

    def get(layer, name):
        obj = layer
        for part in name.split("."):
            obj = getattr(obj, part, None)
        return obj

    first = layers[0]
    missing = [name for name in COLUMN + ROW
               if not isinstance(get(first, name), (nn.Linear, LoRALinear))]
    if missing:
        raise UsageError(f"--sharding tensor knows the llama/mistral layout (q/k/v/o and "
                         f"gate/up/down projections); this model "
                         f"({type(model).__module__}) has no {', '.join(missing)}")
    attn = first.self_attn
    width = _base_linear(get(first, "mlp.gate_proj")).weight.shape[0]
    if width % n:
        raise UsageError(f"--sharding tensor splits the MLP: its width {width} does not "
                         f"divide by {n} ranks")
    heads = attn.n_heads % n == 0 and attn.n_kv_heads % n == 0
    plan = Sharding("tensor", group)
    names = [x for x in COLUMN + ROW if heads or not x.startswith("self_attn.")]
    for layer in layers:
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = get(layer, parent_name)
            kind = "all-to-sharded" if name in COLUMN else "sharded-to-all"
            setattr(parent, leaf, _tp_layer(getattr(parent, leaf), kind, group, plan,
                                             f"{paths[id(layer)]}.{name}"))
        if heads:
            layer.self_attn.n_heads //= n
            layer.self_attn.n_kv_heads //= n
    plan.notes.append(
        f"tensor: MLP ({width} wide) split in {n} in every layer; " +
        (f"attention split by heads ({attn.n_heads * n} query, {attn.n_kv_heads * n} "
         "key-value heads)" if heads else
         f"attention whole on every rank ({attn.n_heads} query / {attn.n_kv_heads} "
         f"key-value heads do not divide by {n} ranks)") +
        "; embedding and norms whole on every rank")
    return plan
