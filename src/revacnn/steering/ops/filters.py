"""Operations on the filters of one layer: ``widen`` (add filters), ``remove_filters`` and ``reinit_filters``.

Widening and removing change the channel count of a whole coupled group (the producers that add into one stream,
their BatchNorms and every reader), then carry the optimizer state over; re-initialising rewrites some filters in
place and zeroes their optimizer-state rows.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import commands as C
from ..errors import SteeringError
from ..graph import Group
from ..optimizer import reset_state_rows

if TYPE_CHECKING:
    from ..engine import SteeringEngine

MAX_COUNT = 4096


def _resize_plan(op: str, name: str, group: Group, index: list[int], how: dict, in_scale: list[float] | None,
                 state_scale: list[float] | None) -> dict:
    """The change-log entry of a resize: the op's own fields (``how``), the group, which channels it keeps
    (``index``, with repeats for copies) and how their outgoing weights and optimizer state scale."""
    return {"op": op, "layer": name, **how, "channels": group.channels, "producers": list(group.producers),
            "batchnorms": list(group.batchnorms), "norms": list(group.norms), "channelwise": list(group.channelwise),
            "scales": [list(s) for s in group.scales], "readers": [list(r) for r in group.readers], "index": index,
            "in_scale": in_scale, "state_scale": state_scale}


def _check_group_norms(op: str, group: Group, width: int) -> None:
    """A GroupNorm in the group needs a channel count its number of groups divides."""
    for norm, groups in group.group_norms.items():
        if width % groups:
            raise SteeringError(f"{op}: GroupNorm {norm} splits the channels into {groups} groups; the new channel "
                                f"count {width} is not a multiple of {groups}")


def _check_whole_blocks(op: str, group: Group, filters: list[int]) -> None:
    """Removing from a group with grouped convs: whole conv groups only (their channels are read together)."""
    b = group.block
    if b == 1:
        return
    removed = set(filters)
    partial = sorted({f // b for f in removed if any(c not in removed for c in range(f // b * b, f // b * b + b))})
    if partial:
        raise SteeringError(f"{op}: the grouped conv(s) {group.channelwise} read these channels in groups of {b}; "
                            f"remove whole groups (filters {partial[0] * b}…{partial[0] * b + b - 1} for group "
                            f"{partial[0]}), not part of one")


def _slices_text(group: Group) -> str:
    size = group.channels // group.slices
    return (f"the grouped conv(s) {group.grouped} split these channels into {group.slices} groups of {size} "
            + (f"(filters 0…{size - 1}, {size}…{2 * size - 1}, …)" if size > 1 else "(one filter each)"))


def _check_equal_slices(op: str, group: Group, filters: list[int]) -> None:
    """Removing from a group that grouped convs (in ≠ out) split into slices: the same number from every slice,
    so each conv group keeps one size."""
    if group.slices == 1:
        return
    size = group.channels // group.slices
    counts = [0] * group.slices
    for f in filters:
        counts[f // size] += 1
    if len(set(counts)) > 1:
        raise SteeringError(f"{op}: {_slices_text(group)}; remove the same number of filters from every group, "
                            f"not {counts}")


def _net2net_shares(index: list[int], rng: random.Random, split: str) -> list[float]:
    """Each output channel's share of its source's outgoing weights: copies of one source split 1 between them
    (evenly, or by random weights from U(0.5, 1.5)); a channel without copies keeps 1."""
    copies: dict[int, list[int]] = {}
    for j, s in enumerate(index):
        copies.setdefault(s, []).append(j)
    share = [1.0] * len(index)
    for js in copies.values():
        if len(js) == 1:
            continue
        w = [1.0] * len(js) if split == "even" else [rng.uniform(0.5, 1.5) for _ in js]
        total = sum(w)
        for j, wj in zip(js, w):
            share[j] = wj / total
    return share


def _random_fill(engine: SteeringEngine, plan: dict, added: list[int], seed: int):
    """The paper's init: new filters (at the positions ``added``) and their reader slices from U(-0.2, 0.2)."""
    def fill():
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in plan["producers"] + plan["channelwise"]:
                mod = engine.module.get_submodule(p)
                for t in (mod.weight, mod.bias):
                    if t is not None:
                        t[added] = (torch.rand(t[added].shape, generator=gen) * 0.4 - 0.2).to(t)
            for r, hw, offset in plan["readers"]:
                mod = engine.module.get_submodule(r)
                w = mod.weight
                if getattr(mod, "groups", 1) > 1:  # every group's new columns sit where the first group's do
                    cols = [p for p in added if p < w.shape[1]]
                else:
                    cols = [offset + p * (hw or 1) + k for p in added for k in range(hw or 1)]
                w[:, cols] = (torch.rand(w[:, cols].shape, generator=gen) * 0.4 - 0.2).to(w)
    return fill


def _placement(op: str, group: Group, count: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Where ``count`` new channels go and which channel each copies: ``(index, added)``, ``index[j]`` the old
    channel that new channel j is (kept) or copies, ``added`` the positions of the copies.

    Channelwise convs (in == out) copy whole conv groups of ``group.block`` channels (a copied group keeps its
    kernels). Grouped convs with in ≠ out split the channels into ``group.slices`` slices: each slice gets the same
    number of copies, of its own channels, at its end, so every conv group still writes or reads one slice.
    Without those the copies of random channels follow the old ones.
    """
    b, s = group.block, group.slices
    if count % (b * s):
        blocks = f"the grouped conv(s) {group.channelwise} read these channels in groups of {b}"
        if s == 1:
            raise SteeringError(f"{op}: {blocks}; widen by a multiple of {b} (whole groups), not {count}")
        raise SteeringError(f"{op}: {_slices_text(group)}" + (f", and {blocks}" if b > 1 else "")
                            + f"; widen by a multiple of {b * s} (the same number of new filters in every group"
                            + (f", whole groups of {b}" if b > 1 else "") + f"), not {count}")
    size = group.channels // s
    index: list[int] = []
    added: list[int] = []
    for first in range(0, group.channels, size):
        index.extend(range(first, first + size))
        for block in [rng.randrange(size // b) for _ in range(count // s // b)]:
            added.extend(range(len(index), len(index) + b))
            index.extend(range(first + block * b, first + block * b + b))
    return index, added


def widen(engine: SteeringEngine, args: dict):
    """Add ``count`` filters to a layer's coupled group, copies of random existing ones (net2net) or random.

    Preserves (net2net): the function exactly (eval and train mode) unless a LayerNorm/GroupNorm normalises over
    the channels (then refused, or with ``allow_inexact`` applied and the measured change reported), the old
    filters and their optimizer-state slices bitwise; copies start from their source's optimizer state.
    ``random`` preserves the old filters and state slices, not the function.
    """
    op = "widen"
    name = engine.layer_arg(args, "layer", op)
    count = C.get_int(args, "count", op, minimum=1)
    if count > MAX_COUNT:
        raise SteeringError(f"widen: count {count} is larger than the limit {MAX_COUNT}")
    init = C.get_choice(args, "init", op, ("net2net", "random"))
    split = C.get_choice(args, "split", op, ("uneven", "even"))
    seed = C.get_int(args, "seed", op, default=0)
    allow_inexact = C.get_bool(args, "allow_inexact", op, False)
    group = engine.channel_group(name, op)
    width = group.channels
    if init == "net2net" and group.inexact and not allow_inexact:
        raise SteeringError(f"widen: copies of {name}'s channels cannot keep the function: "
                            + "; ".join(group.inexact) + ". Pass allow_inexact=true to widen anyway; the ack "
                            "then reports the measured output change")
    _check_group_norms(op, group, width + count)
    rng = random.Random(seed)
    index, added = _placement(op, group, count, rng)
    new = set(added)
    kept_at = [j for j in range(len(index)) if j not in new]  # old channel c is now at kept_at[c]
    share = _net2net_shares(index, rng, split) if init == "net2net" else [1.0] * len(index)
    state_scale = [share[j] / share[kept_at[index[j]]] if j in new else 1.0 for j in range(len(index))]
    how = {"init": init, "split": split, "seed": seed, "allow_inexact": allow_inexact}
    plan = _resize_plan("widen", name, group, index, how, share if init == "net2net" else None, state_scale)
    fill = _random_fill(engine, plan, added, seed) if init == "random" else None
    changes, maps = engine.resize(op, name, group, plan, list(range(width)), added, fill)
    exact = init == "net2net" and not group.inexact
    changes.update(sources=[index[j] for j in added], added_at=added, init=init, split=split,
                   function_preserving=exact)
    if group.inexact and init == "net2net":
        changes["inexact"] = list(group.inexact)
    return True, changes, maps


def remove_filters(engine: SteeringEngine, args: dict):
    """Remove filters from every member of the layer's coupled group, its BatchNorms, its readers and the
    optimizer state.

    Preserves: the kept filters, their reader slices and optimizer-state slices bitwise; not the function.
    """
    op = "remove_filters"
    name = engine.layer_arg(args, "layer", op)
    width = engine.filter_layer(name, op).weight.shape[0]
    filters = C.get_int_list(args, "filters", op, upper=width, what="filter")
    if len(filters) >= width:
        raise SteeringError(f"remove_filters: cannot remove all {width} filters of {name}")
    group = engine.channel_group(name, op)
    _check_whole_blocks(op, group, filters)
    _check_equal_slices(op, group, filters)
    _check_group_norms(op, group, group.channels - len(filters))
    kept = [i for i in range(group.channels) if i not in set(filters)]
    plan = _resize_plan("remove_filters", name, group, kept, {"filters": sorted(filters)}, None, None)
    changes, maps = engine.resize(op, name, group, plan, kept, [])
    changes.update(removed=sorted(filters), function_preserving=False)
    return True, changes, maps


def _neighbour_average(layer: nn.Module, args: dict, filters: list[int], op: str):
    """One weight (and bias) for every filter: the inverse-distance-weighted average of the neighbours."""
    if "neighbours" not in args or "distances" not in args:
        raise SteeringError("reinit_filters: mode 'neighbours' needs 'neighbours' and 'distances'")
    w = layer.weight
    nbrs = C.get_int_list(args, "neighbours", op, upper=w.shape[0], what="neighbour filter")
    dists = args["distances"]
    if not isinstance(dists, (list, tuple)) or len(dists) != len(nbrs):
        raise SteeringError(f"reinit_filters: 'distances' must be a list of {len(nbrs)} numbers, one per "
                            f"neighbour")
    dists = [C.get_float({"d": d}, "d", op + " distance", minimum=0.0, strict=True) for d in dists]
    # Inverse-distance weights (1/d_i) / sum_j (1/d_j), computed as (d_min/d_i) / sum_j (d_min/d_j): every term is
    # in (0, 1] and the nearest is exactly 1, so no distance (a subnormal 1e-320, whose inverse is inf in float64,
    # or 1e308) overflows or leaves a NaN; the average is a convex combination, as finite as the neighbours.
    nearest = min(dists)
    inv = torch.tensor([nearest / d for d in dists], dtype=torch.float64)
    inv = inv / inv.sum()
    idx = torch.as_tensor(nbrs, device=w.device)
    avg_w = (w.detach().index_select(0, idx).double() * inv.to(w.device).view(-1, *[1] * (w.dim() - 1))).sum(0).to(w)
    avg_b = None
    if layer.bias is not None:
        avg_b = (layer.bias.detach().index_select(0, idx).double() * inv.to(w.device)).sum().to(w)
    return [avg_w] * len(filters), [avg_b] * len(filters)


def _given_values(layer: nn.Module, args: dict, filters: list[int]):
    """The weights in ``values``, one nested list per filter, checked for shape and finiteness; biases kept."""
    if "values" not in args:
        raise SteeringError("reinit_filters: mode 'values' needs 'values'")
    w = layer.weight
    shape = tuple(w.shape[1:])
    parts = "in_features" if isinstance(layer, nn.Linear) else "in_channels × kernel size"
    values = args["values"]
    if not isinstance(values, (list, tuple)) or len(values) != len(filters):
        raise SteeringError(f"reinit_filters: 'values' must be a list of {len(filters)} filter(s), each "
                            f"shaped {list(shape)}")
    new_w = []
    for i, v in enumerate(values):
        _check_nested_numbers(v, shape, f"reinit_filters: filter {i} in 'values'", parts)
        try:
            tv = torch.tensor(v, dtype=torch.float64)
        except (OverflowError, RuntimeError):  # an int beyond float64 (10**400)
            raise SteeringError(f"reinit_filters: filter {i} in 'values' has a number beyond float64") from None
        if not torch.isfinite(tv).all():
            raise SteeringError("reinit_filters: 'values' contains NaN or infinity")
        new_w.append(tv.to(w))
    return new_w, [None] * len(filters)


def _check_nested_numbers(value, shape: tuple[int, ...], what: str, parts: str) -> None:
    """``value`` is nested lists shaped ``shape`` of numbers (ints or floats; bools are not numbers); checked
    level by level without recursion, so neither deep nesting nor a wrong shape reaches ``torch.tensor``."""
    level = [value]
    for depth, size in enumerate(shape):
        nxt = []
        for item in level:
            if not isinstance(item, (list, tuple)):
                raise SteeringError(f"{what} is not a nested list of numbers shaped {list(shape)} ({parts}): found "
                                    f"a {type(item).__name__} at depth {depth}")
            if len(item) != size:
                raise SteeringError(f"{what} has a list of length {len(item)} at depth {depth}, expected "
                                    f"{list(shape)} ({parts})")
            nxt.extend(item)
        level = nxt
    for item in level:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise SteeringError(f"{what} is not a nested list of numbers: found {item!r} (bools are not numbers)")


def _check_finite(name: str, layer: nn.Module, new_w: list, new_b: list) -> None:
    """Every new weight and bias finite in the layer's dtype (1e39 is finite in float64, inf in float32)."""
    dtype = str(layer.weight.dtype).removeprefix("torch.")
    for t in [*new_w, *(b for b in new_b if b is not None)]:
        if not torch.isfinite(t).all():
            raise SteeringError(f"reinit_filters: the new values of {name} are not finite in {dtype} (the largest "
                                f"{dtype} is {torch.finfo(layer.weight.dtype).max:.4g}); nothing changed")


def _keep_rows(engine: SteeringEngine, layer: nn.Module, filters: list[int]):
    """A function that puts back the rows ``filters`` of the layer's weight and bias and of their optimizer state,
    as they are now."""
    saved = []
    for param in (layer.weight, layer.bias):
        if param is None:
            continue
        saved.append((param, param.detach()[filters].clone()))
        for opt in engine.optimizers:
            for value in opt.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    saved.append((value, value[filters].clone()))

    def restore():
        with torch.no_grad():
            for tensor, rows in saved:
                tensor[filters] = rows
    return restore


def _random_values(layer: nn.Module, args: dict, filters: list[int], op: str):
    """Weights and biases drawn as PyTorch's default init of conv and Linear layers does, from ``seed``."""
    w = layer.weight
    shape = tuple(w.shape[1:])
    gen = torch.Generator().manual_seed(C.get_int(args, "seed", op, default=0))
    bound = 1.0 / math.sqrt(max(1, w[0].numel()))  # PyTorch's default init range of conv and Linear weights
    new_w, new_b = [], []
    for _ in filters:
        new_w.append((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(w))
        new_b.append(None if layer.bias is None else
                     (torch.rand((), generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(w))
    return new_w, new_b


def reinit_filters(engine: SteeringEngine, args: dict):
    """Rewrite some filters of a layer in place (neighbour average, given values or random) and zero their
    optimizer-state rows.

    Preserves: every other filter and its optimizer state; the layer's shape (not structural, not in the change
    log).
    """
    op = "reinit_filters"
    name = engine.layer_arg(args, "layer", op)
    layer = engine.filter_layer(name, op)
    engine.check_held_weights(name, op)
    filters = C.get_int_list(args, "filters", op, upper=layer.weight.shape[0], what="filter")
    mode = C.get_choice(args, "mode", op, ("neighbours", "values", "random"))
    allowed = {"neighbours": {"neighbours", "distances"}, "values": {"values"}, "random": {"seed"}}[mode]
    extra = sorted({"neighbours", "distances", "values", "seed"} & set(args) - allowed)
    if extra:
        raise SteeringError(f"reinit_filters: field(s) {', '.join(extra)} do not apply to mode {mode!r}")
    if mode == "neighbours":
        new_w, new_b = _neighbour_average(layer, args, filters, op)
    elif mode == "values":
        new_w, new_b = _given_values(layer, args, filters)
    else:
        new_w, new_b = _random_values(layer, args, filters, op)
    _check_finite(name, layer, new_w, new_b)
    before = engine.outputs()
    restore = _keep_rows(engine, layer, filters)
    with torch.no_grad():
        for f, nw, nb in zip(filters, new_w, new_b):
            layer.weight[f] = nw
            if nb is not None:
                layer.bias[f] = nb
    reset_state_rows(engine.optimizers, layer.weight, filters)
    if layer.bias is not None:
        reset_state_rows(engine.optimizers, layer.bias, filters)
    after = engine.outputs()
    if engine.became_non_finite(before, after):  # finite weights can still overflow downstream (3e38 × inputs)
        restore()
        raise engine.non_finite_error(op)
    delta = engine.max_abs_change(before, after)
    return False, {"layer": name, "filters": filters, "mode": mode, "output_max_abs_change": delta}, {}
