"""Coupling analysis: which layers must change together when a layer's output channels change.

The coupling comes from Torch-Pruning's ``DependencyGraph`` (package ``torch-pruning``), built from the one traced
forward of :mod:`revacnn.tracer`: it follows the autograd graph through activations, pooling, padding modules,
residual additions, elementwise products (squeeze-excitation gates), concatenation offsets, reshape/flatten into a
Linear, permutes to channels-last tokens, depthwise convs, BatchNorm, LayerNorm, GroupNorm and per-channel
parameters used directly in ``forward`` (layer-scale). This module turns its pruning group of a layer into a
:class:`Group` by role, and adds what a *resize* (growth as well as pruning) needs that Torch-Pruning does not
check, as problems (refusals) or inexactness reasons:

- grouped convs whose input and output channels are the same space (depthwise, RegNet's group convs) move with
  the group (``channelwise``; the group's channels change by whole conv groups);
- grouped convs whose output channels are not their input channels (in ≠ out: a depthwise conv with a channel
  multiplier, SqueezeBERT's grouped 1×1 convs) write or read the channels in ``slices`` equal contiguous slices:
  a resize adds or removes the same number in every slice, new channels inside their slice;
- LayerNorm/GroupNorm over the channels make copied channels change their statistics (``inexact``);
- a Linear that reads a flatten of permuted (channels-last) maps, a reader of part of the channels (split, slice),
  a module called more than once, a layer kind with no resize rule (ConvTranspose, PReLU, attention …), or channels
  that reach the model output directly, refuse, naming the layers and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch_pruning import ops as tp_ops

from ..tracer import INPUT, ForwardRecord, eager, record
from .errors import SteeringError
from .insertion import run_inserted

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # not the transposed ones: their filters are not weight rows
FILTER_LAYERS = (*CONVS, nn.Linear)  # layers whose filters (neurons) are the rows of their weight
NORMS = (nn.LayerNorm, nn.GroupNorm)
SPLITS = (tp_ops._SplitOp, tp_ops._SliceOp, tp_ops._UnbindOp, tp_ops._ExpandOp)
PERMUTES = ("PermuteBackward0", "TransposeBackward0", "TransposeBackward1")
__all__ = ["CONVS", "FILTER_LAYERS", "Group", "Trace", "eager", "trace"]


@dataclass
class Group:
    """Layers that share one channel space, by what a resize does to each."""

    channels: int
    producers: list[str] = field(default_factory=list)    # conv / Linear writing it: weight rows, bias
    batchnorms: list[str] = field(default_factory=list)   # per-channel affine and running statistics
    norms: list[str] = field(default_factory=list)        # LayerNorm / GroupNorm over the channels: weight, bias
    channelwise: list[str] = field(default_factory=list)  # grouped convs with in == out channels: rows, groups
    scales: list[list] = field(default_factory=list)      # [parameter name, dim]: per-channel parameters (layer-scale)
    readers: list[tuple[str, int, int]] = field(default_factory=list)  # (name, hw, offset): input slices
    problems: list[str] = field(default_factory=list)     # why it cannot be resized at all
    inexact: list[str] = field(default_factory=list)      # why copying channels cannot keep the function
    block: int = 1                                        # its channels change in whole blocks of this many
    group_norms: dict[str, int] = field(default_factory=dict)  # GroupNorm name -> its number of groups
    grouped: list[str] = field(default_factory=list)      # grouped convs with in ≠ out channels writing or reading it
    slices: int = 1  # those split the channels into this many equal slices that never mix (the lcm of their groups)

    def check(self, action: str) -> None:
        if self.problems:
            raise SteeringError(f"cannot {action}: coupled layers {sorted(self.producers)} — "
                                + "; ".join(sorted(set(self.problems))))

    def members(self) -> list[str]:
        """Every module whose tensors the resize replaces."""
        return [*self.producers, *self.batchnorms, *self.norms, *self.channelwise, *(r for r, _, _ in self.readers)]


@dataclass
class Trace:
    """One traced forward: per hooked module its calls and shapes, who uses its output, and the coupling groups."""

    calls: dict[str, int]
    in_shape: dict[str, tuple]
    out_shape: dict[str, tuple]
    followers: dict[str, list[str]]          # module name -> type names of autograd nodes that use its output
    follower_modules: dict[str, list[str]]   # module name -> names of hooked modules that use its output directly
    module: nn.Module
    rec: ForwardRecord
    graph: tp.DependencyGraph

    def group(self, name: str) -> Group | None:
        """The coupled group of ``name``'s output channels (None if ``name`` did not run on the example input)."""
        return _GroupBuilder(self, name).build()


def _hooked(module: nn.Module) -> list[str]:
    """The modules the trace hooks: convs, Linear, norms, and every other module with parameters of its own."""
    return [name for name, mod in module.named_modules()
            if name and (isinstance(mod, (*CONVS, nn.Linear, _BatchNorm, *NORMS))
                         or any(True for _ in mod.parameters(recurse=False)))]


def last_hook_runs_inserted_layers(module: nn.Module) -> None:
    """Move the hook that runs the layers ``insert_layer`` put after an anchor to the end of the anchor's forward
    hooks: hooks registered later (Torch-Pruning's, which map each layer's output to the layer) then see the
    anchor's own output, not the inserted layers'."""
    for mod in module.modules():
        for key in [key for key, hook in mod._forward_hooks.items() if hook is run_inserted]:
            mod._forward_hooks.move_to_end(key)


def trace(module: nn.Module, example_input: torch.Tensor) -> Trace:
    """One eval-mode forward on ``example_input`` recording the hooked modules and Torch-Pruning's dependency graph."""
    graph = tp.DependencyGraph()

    def run(forward):
        out = {}

        def forward_fn(_model, _inputs):
            last_hook_runs_inserted_layers(module)   # after Torch-Pruning's hooks, which must see a layer's own output
            out["value"] = forward()
            return out["value"]

        graph.build_dependency(module, example_inputs=example_input, forward_fn=forward_fn, verbose=False)
        return out["value"]

    rec = record(module, example_input, _hooked(module), run=run)
    users = rec.users()
    out_of = {id(node): name for name, node in rec.output_node.items()}
    followers = {name: [type(u).__name__ for u in users.get(id(node), [])] for name, node in rec.output_node.items()}
    follower_modules = {name: [out_of[id(u)] for u in users.get(id(node), []) if id(u) in out_of]
                        for name, node in rec.output_node.items()}
    return Trace(calls=rec.calls, in_shape=rec.in_shape, out_shape=rec.out_shape, followers=followers,
                 follower_modules=follower_modules, module=module, rec=rec, graph=graph)


def _out_fn(mod: nn.Module):
    return tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels


def _channelwise(mod: nn.Module) -> bool:
    """A grouped conv whose output channel c reads only input channels of c's own group, in == out: its input and
    output channels are one space (depthwise convs, RegNet's and ResNeXt's group convs)."""
    return isinstance(mod, CONVS) and mod.groups > 1 and mod.in_channels == mod.out_channels


class _GroupBuilder:
    """Turns Torch-Pruning's pruning groups around one layer into a :class:`Group` (see the module docstring)."""

    def __init__(self, t: Trace, name: str) -> None:
        self.t, self.name = t, name
        self.names = {mod: n for n, mod in t.module.named_modules()}
        self.order = {n: i for i, n in enumerate(self.names.values())}
        self.params = {id(p): n for n, p in t.module.named_parameters()}
        self.seen: set[tuple[str, bool]] = set()
        self.positions: dict[str, dict[int, list[int]]] = {}  # reader -> channel -> its input positions

    def build(self) -> Group | None:
        mod = self.t.module.get_submodule(self.name)
        if mod not in self.t.graph.module2node or self.name not in self.t.rec.output_node:
            return None
        self.group = Group(channels=int(mod.weight.shape[0]))
        pending = [(mod, _out_fn(mod))]
        while pending:
            m, fn = pending.pop()
            pending.extend(self._add_items(m, fn))
        self._finish()
        return self.group

    def _add_items(self, mod: nn.Module, fn) -> list:
        """Classify the items of ``mod``'s pruning group; return channelwise convs whose other side must join."""
        more = []
        items = self.t.graph.get_pruning_group(mod, fn, idxs=list(range(self.group.channels)))
        for item in items.items:
            target = item.dep.target.module
            is_out = self.t.graph.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(target, nn.Parameter):
                self._scale(target, item.dep.target.pruning_dim)
            elif isinstance(target, tp_ops._OutputOp):
                self.group.problems.append(f"{self.name}'s channels reach the model output directly")
            elif isinstance(target, SPLITS):
                self.group.problems.append(f"the channels are split or sliced ({type(target).__name__[1:-2]})")
            elif isinstance(target, nn.Module) and target in self.names and not type(target).__module__.startswith(
                    "torch_pruning"):
                name = self.names[target]
                if (name, is_out) in self.seen:
                    continue
                self.seen.add((name, is_out))
                if _channelwise(target):
                    for side in (tp.prune_conv_out_channels, tp.prune_conv_in_channels):
                        if (name, side is tp.prune_conv_out_channels) not in self.seen:
                            more.append((target, side))
                self._member(name, target, is_out, item)
        return more

    def _scale(self, param: nn.Parameter, dim: int) -> None:
        name = self.params.get(id(param), "a parameter")
        per_channel = (0 <= dim < param.dim() and param.shape[dim] == self.group.channels
                       and all(s == 1 for i, s in enumerate(param.shape) if i != dim))
        if not per_channel:
            self.group.problems.append(f"parameter {name} {list(param.shape)} is used directly in forward on the "
                                       "channels and is not one value per channel")
        elif [name, dim] not in self.group.scales:
            self.group.scales.append([name, dim])

    def _member(self, name: str, mod: nn.Module, is_out: bool, item) -> None:
        g = self.group
        calls = self.t.calls.get(name, 0)
        if calls > 1:
            g.problems.append(f"{name} is called {calls} times in forward (shared weights)")
        if _channelwise(mod):
            g.channelwise.append(name)
            g.block = math.lcm(g.block, mod.in_channels // mod.groups)
            return
        if isinstance(mod, CONVS) and mod.groups > 1:  # in ≠ out: a producer or a reader, by slices
            g.grouped.append(name)
            g.slices = math.lcm(g.slices, mod.groups)
        if isinstance(mod, FILTER_LAYERS):
            if is_out:
                g.producers.append(name)
            else:
                self.positions[name] = self._positions(item)
        elif isinstance(mod, _BatchNorm):
            g.batchnorms.append(name)
        elif isinstance(mod, nn.LayerNorm) and tuple(mod.normalized_shape) == (g.channels,):
            g.norms.append(name)
            g.inexact.append(f"LayerNorm {name} normalises over the channels (copies change its mean and variance)")
        elif isinstance(mod, nn.GroupNorm):
            g.norms.append(name)
            g.group_norms[name] = mod.num_groups
            g.inexact.append(f"GroupNorm {name} normalises over groups of channels (copies change their mean and "
                             "variance)")
        else:
            g.problems.append(f"unsupported layer {name} ({type(mod).__name__}) in the channel path")

    @staticmethod
    def _positions(item) -> dict[int, list[int]]:
        positions: dict[int, list[int]] = {}
        for idx, root in zip(item.idxs, item.root_idxs):
            positions.setdefault(int(root), []).append(int(idx))
        return positions

    def _reader(self, name: str, positions: dict[int, list[int]]) -> tuple[str, int, int] | None:
        """``(name, hw, offset)`` when channel c owns the input positions offset + c·hw … offset + (c+1)·hw − 1 of
        the reader (a flatten of channels-first maps, or a block of a concatenation); else a problem."""
        g, mod = self.group, self.t.module.get_submodule(name)
        if sorted(positions) != list(range(g.channels)):
            g.problems.append(f"{name} reads only part of the channels")
            return None
        hw = len(positions[0])
        offset = min(positions[0])
        if any(sorted(positions[c]) != list(range(offset + c * hw, offset + (c + 1) * hw)) for c in positions):
            g.problems.append(f"{name} reads the channels through an unsupported reshape")
            return None
        if isinstance(mod, CONVS) and hw != 1:
            g.problems.append(f"{name} reads the channels through a reshape")
            return None
        if isinstance(mod, CONVS) and mod.groups > 1 and (offset or mod.in_channels != g.channels):
            g.problems.append(f"{name} is a grouped conv ({mod.groups} groups) reading these channels as part of a "
                              "concatenation; its groups would not follow them")
            return None
        if hw > 1 and self._permuted(name):
            g.problems.append(f"{name} reads a flatten of permuted (channels-last) maps; only a flatten of "
                              "channels-first maps maps channels to columns")
            return None
        return name, (hw if isinstance(mod, nn.Linear) else 0), offset

    def _permuted(self, name: str) -> bool:
        """Whether a permute or transpose lies between ``name``'s input and the modules that produced it."""
        outputs = {id(node) for node in self.t.rec.output_node.values()}
        stack, seen = list(self.t.rec.inputs.get(name, [])), set()
        while stack:
            node = stack.pop()
            if node is None or node is INPUT or id(node) in seen or id(node) in outputs:
                continue
            seen.add(id(node))
            if type(node).__name__ in PERMUTES:
                return True
            stack.extend(n for n, _ in node.next_functions)
        return False

    def _finish(self) -> None:
        g, rec = self.group, self.t.rec
        for name in g.producers:
            if any(rec.output_node[name] is o.grad_fn for o in rec.outputs):
                g.problems.append(f"{name}'s channels reach the model output directly")
        for name, positions in self.positions.items():
            reader = self._reader(name, positions)
            if reader is not None:
                g.readers.append(reader)
        for key in ("producers", "batchnorms", "norms", "channelwise"):
            setattr(g, key, sorted(set(getattr(g, key)), key=self.order.__getitem__))
        g.readers.sort(key=lambda r: self.order[r[0]])
        g.grouped = sorted(set(g.grouped), key=self.order.__getitem__)
        if g.slices > 1 and (g.channels // g.slices) % g.block:
            g.problems.append(f"the grouped conv(s) {g.grouped} split the channels into {g.slices} groups of "
                              f"{g.channels // g.slices}, which cut through the groups of {g.block} that "
                              f"{g.channelwise} read")
        g.problems = list(dict.fromkeys(g.problems))
        g.inexact = list(dict.fromkeys(g.inexact))
