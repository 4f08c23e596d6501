"""Coupling analysis: which layers must change together when a layer's output channels change.

A forward pass on the example input (eval mode, no state changes) is recorded with forward hooks on every leaf
module; from each *reader* (a Conv1d/2d/3d or Linear) the autograd graph is walked back through
``grad_fn.next_functions`` to the *producers* (conv and Linear outputs) whose channels it sees. Channel-preserving
nodes (activations, pooling, dropout, scalar arithmetic) are passed through, BatchNorm modules are collected and
passed through, additions couple their operands (a residual stream), and a view/flatten feeding a Linear gives the
spatial factor HW (channels first: channel c owns columns c·HW…(c+1)·HW−1). A Linear's channels are its output
features when its output is ``[batch, features]``. Anything else (concat, permute, products of two tensors,
functional batch norm, an unknown module with parameters, a module called twice, a Linear applied to tokens) makes
the groups it touches *unsupported*, with the reason. Works with functional ops in ``forward`` and needs no change
to the user's model.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

PRESERVING = {
    "ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1", "LeakyReluBackward0",
    "LeakyReluBackward1", "GeluBackward0", "SigmoidBackward0", "TanhBackward0", "HardtanhBackward0",
    "HardtanhBackward1", "EluBackward0", "EluBackward1", "SiluBackward0", "HardswishBackward0", "MishBackward0",
    "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "NativeDropoutBackward0", "CloneBackward0", "DivBackward1", "MulBackward1",
    "AddBackward1", "SubBackward1", "NegBackward0", "ToCopyBackward0", "MaxPool3DWithIndicesBackward0",
    "AvgPool3DBackward0", "AdaptiveAvgPool3DBackward0", "AdaptiveMaxPool3DBackward0",
}
SQUEEZES = {"SqueezeBackward1", "UnsqueezeBackward0"}  # 1-D pooling runs as unsqueeze → 2-D pool → squeeze
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # not the transposed ones: their filters are not weight rows
FILTER_LAYERS = (*CONVS, nn.Linear)  # layers whose filters (neurons) are the rows of their weight
COUPLING = {"AddBackward0", "SubBackward0"}
SCALAR_BINARY = {"MulBackward0", "DivBackward0"}  # preserving only when the second operand is a constant
VIEWS = {"ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "FlattenBackward0"}


@dataclass
class Group:
    """Layers that share one channel space: producers write it, BNs normalise it, readers read it."""

    channels: int
    producers: list[str] = field(default_factory=list)
    batchnorms: list[str] = field(default_factory=list)
    readers: list[tuple[str, int]] = field(default_factory=list)  # (name, HW factor; 0 for a conv reader)
    problems: list[str] = field(default_factory=list)

    def check(self, action: str) -> None:
        from .errors import SteeringError
        if self.problems:
            raise SteeringError(f"cannot {action}: coupled layers {sorted(self.producers)} — "
                                + "; ".join(sorted(set(self.problems))))


@dataclass
class Trace:
    calls: dict[str, int]                    # name -> number of calls
    in_shape: dict[str, tuple]
    out_shape: dict[str, tuple]
    groups: dict[str, Group]                 # producer name -> its group (shared objects)
    followers: dict[str, list[str]]          # module name -> type names of autograd nodes that use its output
    follower_modules: dict[str, list[str]]   # module name -> names of hooked modules that use its output directly


def _walk(start, out_of: dict[int, str], bn_in: dict[str, object], kinds: dict[str, str], input_node):
    """Walk back from ``start``; return producers, BNs, problems, whether a view was crossed, and input reached."""
    producers, bns, problems = set(), set(), []
    views = []
    reached_input = False
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = out_of.get(id(node))
        if name is not None:
            kind = kinds[name]
            if kind in ("conv", "linear"):
                producers.add(name)
            elif kind == "bn":
                bns.add(name)
                stack.append(bn_in[name])
            else:
                problems.append(f"unsupported layer {name} ({kind}) in the channel path")
                # on to the producers behind it, not into its own parameters (no "parameter used directly" then)
                stack.extend(n for n, _ in node.next_functions if type(n).__name__ != "AccumulateGrad")
            continue
        if node is input_node:
            reached_input = True
            continue
        tname = type(node).__name__
        nexts = [n for n, _ in node.next_functions]
        if tname in PRESERVING:
            stack.extend(nexts[:1])
        elif tname in COUPLING:
            stack.extend(nexts)
        elif tname in SCALAR_BINARY and len(nexts) == 2 and nexts[1] is None:
            stack.append(nexts[0])
        elif tname in SQUEEZES and _keeps_channel_dim(node):
            stack.extend(nexts[:1])
        elif tname in VIEWS:
            views.append(node)
            stack.extend(nexts[:1])
        elif tname == "MeanBackward1" and 1 not in tuple(getattr(node, "_saved_dim", (1,))):
            stack.extend(nexts[:1])
        elif tname == "AccumulateGrad":
            problems.append("a parameter used directly in forward")
        else:
            problems.append(f"unsupported operation {tname}")
            stack.extend(nexts)
    return producers, bns, problems, views, reached_input


def _keeps_channel_dim(node) -> bool:
    """Whether a squeeze/unsqueeze node leaves dims 0 and 1 (batch, channels) where they are: its dim is ≥ 2, or,
    for an unsqueeze, −1 or −2 (what 1-D pooling inserts behind a ``[N, C, L]`` map). Dims are saved as unsigned
    64-bit values, negative ones wrapped."""
    dim = getattr(node, "_saved_dim", None)
    if not isinstance(dim, int):
        return False
    if dim >= 2 ** 63:
        dim -= 2 ** 64
    if dim < 0 and type(node).__name__ == "SqueezeBackward1":
        dim += len(getattr(node, "_saved_self_sym_sizes", ()))
    return dim >= 2 or (type(node).__name__ == "UnsqueezeBackward0" and dim in (-1, -2))


def eager():
    """Run compiled modules eagerly (so the autograd graph shows the real ops), if dynamo is in use."""
    if "torch._dynamo" in sys.modules and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


@dataclass
class _Forward:
    """What one hooked forward recorded: per hooked module its calls, input and output autograd nodes and shapes."""

    x: torch.Tensor
    outputs: list
    calls: dict[str, int] = field(default_factory=dict)
    in_node: dict[str, object] = field(default_factory=dict)   # a grad_fn, or ("input", x) for the raw input
    out_node: dict[str, object] = field(default_factory=dict)
    in_shape: dict[str, tuple] = field(default_factory=dict)
    out_shape: dict[str, tuple] = field(default_factory=dict)
    keep: list = field(default_factory=list)  # keeps graph nodes alive so their ids stay unique


def _layer_kinds(module: nn.Module) -> dict[str, str]:
    """``{name: "conv" | "linear" | "bn" | class name}`` of every module that takes part in the channel walk: the
    layers the engine can resize, BatchNorms, and any other module with parameters of its own."""
    kinds = {}
    for name, mod in module.named_modules():
        if isinstance(mod, CONVS):
            kinds[name] = "conv"
        elif isinstance(mod, nn.Linear):
            kinds[name] = "linear"
        elif isinstance(mod, _BatchNorm):
            kinds[name] = "bn"
        elif any(True for _ in mod.parameters(recurse=False)):
            kinds[name] = type(mod).__name__
    return kinds


def _run_hooked(module: nn.Module, example_input: torch.Tensor, kinds: dict[str, str]) -> _Forward:
    """One eval-mode forward with grad on, hooks on the modules of ``kinds``; the training modes are restored."""
    names = {id(m): n for n, m in module.named_modules()}
    param = next(module.parameters(), None)
    x = example_input.detach()
    if param is not None:
        x = x.to(param.device)
    x = x.clone().requires_grad_(x.is_floating_point())
    rec = _Forward(x=x, outputs=[])

    def hook(mod, inputs, output):
        name = names[id(mod)]
        rec.calls[name] = rec.calls.get(name, 0) + 1
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            rec.out_node[name] = output.grad_fn
            rec.out_shape[name] = tuple(output.shape)
            rec.keep.append(output.grad_fn)
        if x is not None:
            rec.in_node[name] = x.grad_fn if x.grad_fn is not None else ("input", x)
            rec.in_shape[name] = tuple(x.shape)

    # prepended: each layer's own output, before the layers insert_layer put after it (steering/insertion.py)
    handles = [mod.register_forward_hook(hook, prepend=True) for name, mod in module.named_modules() if name in kinds]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.enable_grad(), eager():
            output = module(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    rec.outputs = [output] if isinstance(output, torch.Tensor) else (
        list(output.values()) if isinstance(output, dict) else list(output))
    return rec


def _index_graph(rec: _Forward) -> tuple[object, dict[int, list]]:
    """``(input_node, users)``: the AccumulateGrad node of the example input (None if the output does not depend
    on it) and, per node id, the nodes that use its output."""
    input_node = None
    stack = [o.grad_fn for o in rec.outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen: set[int] = set()
    users: dict[int, list] = {}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        rec.keep.append(node)
        if type(node).__name__ == "AccumulateGrad" and getattr(node, "variable", None) is rec.x:
            input_node = node
        for nxt, _ in node.next_functions:
            if nxt is not None:
                users.setdefault(id(nxt), []).append(node)
                stack.append(nxt)
    return input_node, users


def _new_groups(module: nn.Module, kinds: dict[str, str], rec: _Forward, find) -> dict[str, Group]:
    """One group per union of producers (``find`` gives a producer's representative), keyed by every producer,
    with the problems each producer brings on its own."""
    groups: dict[str, Group] = {}
    for name, kind in kinds.items():
        if kind not in ("conv", "linear") or name not in rec.out_node:
            continue
        root = find(name)
        if root not in groups:
            groups[root] = Group(channels=rec.out_shape[name][1])
        g = groups[root]
        g.producers.append(name)
        groups[name] = g
        mod = module.get_submodule(name)
        if kind == "linear" and len(rec.out_shape[name]) != 2:
            g.problems.append(f"{name} is a Linear layer with a {list(rec.out_shape[name])} output (its channels "
                              "can be changed only when it outputs [batch, features])")
        elif kind == "conv" and mod.groups != 1:
            g.problems.append(f"{name} is a grouped/depthwise conv (groups={mod.groups})")
        if rec.calls.get(name, 0) > 1:
            g.problems.append(f"{name} is called {rec.calls[name]} times in forward (shared weights)")
    return groups


def _linear_reader_factor(views: list, in_shape: tuple, channels: int) -> tuple[bool, int]:
    """``(ok, hw)`` for a Linear that reads ``channels``: ok when it reads ``[batch, channels]`` directly or through
    one flatten of ``[batch, channels, *spatial]``; ``hw`` is the product of the spatial sizes."""
    ok = len(views) <= 1
    hw = 1
    if views:
        sizes = tuple(getattr(views[0], "_saved_self_sym_sizes", ()))
        ok = ok and len(sizes) >= 2 and sizes[1] == channels and len(in_shape) == 2
        for s in sizes[2:]:
            hw *= int(s)
    else:
        ok = ok and len(in_shape) == 2
    return ok, hw


def _add_reader(module: nn.Module, g: Group, name: str, kind: str, walk: tuple, rec: _Forward) -> None:
    """Add ``name`` as a reader of ``g``, with the problems of how it reads the group's channels."""
    producers, bns, problems, views, reached_input = walk
    if reached_input:
        g.problems.append(f"the model input is added into the channels read by {name}")
    mod = module.get_submodule(name)
    if kind == "conv":
        if views:
            g.problems.append(f"{name} reads the channels through a reshape")
        if mod.groups != 1:
            g.problems.append(f"reader {name} is a grouped/depthwise conv (groups={mod.groups})")
        elif mod.in_channels != g.channels:
            g.problems.append(f"{name} reads {mod.in_channels} channels, not the {g.channels} produced")
        g.readers.append((name, 0))
    else:
        ok, hw = _linear_reader_factor(views, rec.in_shape[name], g.channels)
        if not ok or mod.in_features != g.channels * hw:
            g.problems.append(f"{name} reads the channels through an unsupported reshape")
        g.readers.append((name, hw))
    if rec.calls.get(name, 0) > 1:
        g.problems.append(f"reader {name} is called {rec.calls[name]} times in forward")


def _attach_loose_batchnorms(kinds: dict[str, str], groups: dict[str, Group], bn_in: dict, out_of: dict) -> None:
    """A BN reading the raw input or found on no reader's path joins whatever produced its input, if any."""
    attached = {b for g in groups.values() for b in g.batchnorms}
    for name, kind in kinds.items():
        if kind == "bn" and name not in attached:
            node = bn_in.get(name)
            if node is not None and id(node) in out_of and out_of[id(node)] in groups:
                groups[out_of[id(node)]].batchnorms.append(name)


def trace(module: nn.Module, example_input: torch.Tensor) -> Trace:
    """Run one eval-mode forward on ``example_input`` and derive every channel group (see module docstring)."""
    kinds = _layer_kinds(module)
    rec = _run_hooked(module, example_input, kinds)
    input_node, users = _index_graph(rec)
    out_of = {id(node): name for name, node in rec.out_node.items()}
    bn_in = {n: (rec.in_node[n] if not isinstance(rec.in_node.get(n), tuple) else None)
             for n in kinds if kinds[n] == "bn"}
    parent: dict[str, str] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    walks = []  # what each conv/Linear reads: the walk back from its input
    for name, kind in kinds.items():
        start = rec.in_node.get(name)
        if kind not in ("conv", "linear") or start is None or isinstance(start, tuple):  # tuple: the raw input
            continue
        walk = _walk(start, out_of, bn_in, kinds, input_node)
        walks.append((name, walk))
        plist = sorted(walk[0])
        for p in plist[1:]:
            parent[find(p)] = find(plist[0])
    groups = _new_groups(module, kinds, rec, find)
    for name, walk in walks:
        producers, bns, problems = walk[:3]
        if not producers:
            continue
        g = groups[next(iter(producers))]
        g.batchnorms.extend(b for b in bns if b not in g.batchnorms)
        g.problems.extend(problems)
        if not any(problem.startswith("unsupported layer") for problem in problems):
            # (else it reads that layer's channels, not the producers': its own checks would only add noise)
            _add_reader(module, g, name, kinds[name], walk, rec)
    for o in rec.outputs:
        if isinstance(o, torch.Tensor) and o.grad_fn is not None:
            producers, bns = _walk(o.grad_fn, out_of, bn_in, kinds, input_node)[:2]
            for p in producers:
                groups[p].problems.append(f"{p}'s channels reach the model output directly")
                groups[p].batchnorms.extend(b for b in bns if b not in groups[p].batchnorms)
    _attach_loose_batchnorms(kinds, groups, bn_in, out_of)
    followers = {name: [type(u).__name__ for u in users.get(id(node), [])] for name, node in rec.out_node.items()}
    follower_modules = {name: [out_of[id(u)] for u in users.get(id(node), []) if id(u) in out_of]
                        for name, node in rec.out_node.items()}
    return Trace(calls=rec.calls, in_shape=rec.in_shape, out_shape=rec.out_shape, groups=groups,
                 followers=followers, follower_modules=follower_modules)
