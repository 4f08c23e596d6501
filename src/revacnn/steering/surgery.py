"""Tensor and module surgery. Pure functions on tensors plus in-place edits of modules; no optimizer here.

Every function says what it preserves. Module edits replace ``nn.Parameter`` objects (never resize in place) and
return ``(old, new, dim, index, state_scale, groups)`` records so that :mod:`.optimizer` can carry the optimizer
state over (``groups`` > 1: ``index`` selects a grouped conv's input channels, :func:`select_in_channels`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .insertion import parent_of


def select(t: torch.Tensor, dim: int, index: list[int], scale: list[float] | None = None) -> torch.Tensor:
    """New tensor whose slice ``j`` along ``dim`` is ``t``'s slice ``index[j]`` times ``scale[j]``.

    Preserves: every selected slice bitwise when ``scale`` is None (or 1 at that position); dtype, device and
    memory format (a channels-last weight stays channels-last). Never modifies ``t``.
    """
    idx = torch.as_tensor(index, dtype=torch.long, device=t.device)
    out = t.index_select(dim, idx)
    if scale is not None:
        shape = [1] * t.dim()
        shape[dim] = len(index)
        factor = torch.as_tensor(scale, dtype=t.dtype, device=t.device).view(shape)
        ones = factor == 1
        out = torch.where(ones, out, out * factor)  # slices with factor 1 stay bitwise equal
    return out.contiguous(memory_format=memory_format_of(t))


def select_in_channels(t: torch.Tensor, groups: int, index: list[int], scale: list[float] | None = None
                       ) -> torch.Tensor:
    """The weight ``t`` of a conv with ``groups`` groups re-indexed along its input channels: the new conv's input
    channel j (counted over all groups, in order) is the old input channel ``index[j]``, times ``scale[j]``.

    Every ``index[j]`` must lie in the old group of the new group of j (``j // (len(index) / groups)``): a filter
    of a grouped conv reads only its own group's channels. A grouped weight ``[out, in/groups, …]`` is viewed as a
    dense one ``[out/groups, in, …]`` (row r: the r-th filter of every group, each reading its group's block of
    columns), selected like a dense reader's columns, and viewed back.

    Preserves: every selected column bitwise where its scale is 1; the filters (rows), their order and their
    groups; dtype, device and memory format. ``groups`` = 1 is :func:`select` along dim 1.
    """
    if groups == 1:
        return select(t, 1, index, scale)
    out, per_group, kernel = t.shape[0], t.shape[1], tuple(t.shape[2:])
    dense = t.reshape(groups, out // groups, per_group, *kernel).transpose(0, 1).reshape(
        out // groups, groups * per_group, *kernel)
    picked = select(dense, 1, index, scale)
    new_per_group = len(index) // groups
    back = picked.reshape(out // groups, groups, new_per_group, *kernel).transpose(0, 1).reshape(
        out, new_per_group, *kernel)
    return back.contiguous(memory_format=memory_format_of(t))


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` (``channels_last_3d``) for a 4-D (5-D) tensor laid out channels-last, and not also plain
    contiguous as a tensor with single-element dims can be; else ``contiguous_format``: what a replacement of ``t``
    should be laid out as, so a channels-last model does not get NCHW layers (each one a layout conversion per
    forward)."""
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if last is not None and not t.is_contiguous() and t.is_contiguous(memory_format=last):
        return last
    return torch.contiguous_format


def flatten_index(index: list[int], hw: int, scale: list[float] | None = None):
    """Channel index (and per-channel scale) → column index of a Linear after an NCHW flatten.

    Preserves the layout rule: channel c owns columns c·hw … (c+1)·hw−1, in order.
    """
    cols = [c * hw + k for c in index for k in range(hw)]
    return cols, (None if scale is None else [s for s in scale for _ in range(hw)])


def _replace(mod: nn.Module, attr: str, new: torch.Tensor, dim: int, index: list[int], state_scale, records,
             groups: int = 1):
    old = getattr(mod, attr)
    if old is None:
        return
    if isinstance(old, nn.Parameter):
        param = nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(mod, attr, param)
        records.append((old, param, dim, index, state_scale, groups))
    else:  # buffer
        setattr(mod, attr, new)


def fix_attributes(mod: nn.Module) -> None:
    """Update a layer's size attributes (out/in channels, features) from its current weight shapes."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        mod.out_channels = mod.weight.shape[0]
        mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, _BatchNorm):
        mod.num_features = mod.running_mean.shape[0] if mod.running_mean is not None else mod.weight.shape[0]


def _resize_rows(mod: nn.Module, attrs: tuple[str, ...], index: list[int], state_scale, records) -> None:
    for attr in attrs:
        t = getattr(mod, attr, None)
        if t is not None:
            _replace(mod, attr, select(t.detach(), 0, index), 0, index, state_scale, records)


def _reader_columns(in_dim: int, channels: int, hw: int, offset: int, index: list[int], in_scale):
    """The input columns (and their scales) of a reader whose channel c owns columns offset + c·hw … offset +
    (c+1)·hw − 1; the columns before and after that block (other parts of a concatenation) stay, scale 1."""
    cols, scale = flatten_index(index, hw, in_scale)
    cols = [offset + c for c in cols]
    before, after = list(range(offset)), list(range(offset + channels * hw, in_dim))
    if scale is not None:
        scale = [1.0] * len(before) + scale + [1.0] * len(after)
    return before + cols + after, scale


def resize_channels(module: nn.Module, plan: dict) -> list:
    """Re-index one channel group: ``plan["index"][j]`` is the old channel that new channel j comes from.

    - producers (conv, also grouped with in ≠ out channels, or Linear, also on channels-last tokens): weight rows
      and bias entries re-indexed (copies are exact duplicates; a grouped conv's ``groups`` stays: the index keeps
      every new filter in the group of its source);
    - batchnorms: gamma, beta, running_mean, running_var re-indexed (num_batches_tracked kept);
    - norms (LayerNorm / GroupNorm over the channels): weight and bias re-indexed, the size attribute set;
    - channelwise (grouped convs with in == out channels, depthwise): weight rows and bias re-indexed, ``groups``
      follows (the index moves whole groups: a copied channel keeps its kernel);
    - scales (``[parameter name, dim]``: per-channel parameters such as layer-scale): re-indexed along dim;
    - readers (``[name, hw]`` or ``[name, hw, offset]``): input slices re-indexed and multiplied by
      ``plan["in_scale"][j]`` (conv: dim 1; Linear: its columns, after a flatten the hw columns of each channel;
      ``offset``: where the group's block starts in a concatenation; a grouped conv (in ≠ out) reading the
      channels: per group, :func:`select_in_channels`).

    The index may interleave copies with the kept channels (grouped convs in the group: new channels at the end of
    their slice); every member follows the same order.

    Preserves: every kept slice bitwise (except reader slices whose scale is not 1); with index = a Net2Net
    mapping and scales summing to 1 over the copies of each source, the network function exactly (up to float
    rounding of the split) unless a LayerNorm/GroupNorm normalises over the channels. Returns optimizer records
    ``(old_param, new_param, dim, index, state_scale, groups)``; ``state_scale`` (producer side only) says how the
    source's optimizer state is scaled for each new slice.
    """
    index = list(plan["index"])
    in_scale = plan.get("in_scale")
    state_scale = plan.get("state_scale")
    channels = plan.get("channels")
    records: list = []
    for name in plan["producers"]:
        mod = module.get_submodule(name)
        _resize_rows(mod, ("weight", "bias"), index, state_scale, records)
        fix_attributes(mod)
    for name in plan.get("channelwise", []):
        mod = module.get_submodule(name)
        _resize_rows(mod, ("weight", "bias"), index, state_scale, records)
        mod.groups = len(index) // mod.weight.shape[1]
        fix_attributes(mod)
    for name in plan["batchnorms"]:
        mod = module.get_submodule(name)
        _resize_rows(mod, ("weight", "bias", "running_mean", "running_var"), index, state_scale, records)
        mod.num_features = len(index)
    for name in plan.get("norms", []):
        mod = module.get_submodule(name)
        _resize_rows(mod, ("weight", "bias"), index, state_scale, records)
        if isinstance(mod, nn.GroupNorm):
            mod.num_channels = len(index)
        else:
            mod.normalized_shape = (len(index),)
    for name, dim in plan.get("scales", []):
        owner, attr = parent_of(module, name)
        _replace(owner, attr, select(getattr(owner, attr).detach(), dim, index), dim, index, state_scale, records)
    for name, hw, *rest in plan["readers"]:
        mod = module.get_submodule(name)
        groups = getattr(mod, "groups", 1)  # a grouped reader (in ≠ out) reads exactly the group's channels
        if groups > 1:
            new = select_in_channels(mod.weight.detach(), groups, index, in_scale)
            _replace(mod, "weight", new, 1, index, None, records, groups)
            fix_attributes(mod)
            continue
        in_dim = mod.weight.shape[1]
        group_channels = channels if channels is not None else in_dim // (hw or 1)
        cols, scale = _reader_columns(in_dim, group_channels, hw or 1, rest[0] if rest else 0, index, in_scale)
        _replace(mod, "weight", select(mod.weight.detach(), 1, cols, scale), 1, cols, None, records)
        fix_attributes(mod)
    return records
