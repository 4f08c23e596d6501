"""``insert_layer`` and ``remove_layer``: splice a whole layer into or out of the network, with its parameters
into or out of the optimizer.

Where the new layer goes (``insert_layer after=L``): after L, or after the BatchNorm that directly takes L's
output, or after the last layer inserted there before (``insertion.chain_end``). If the one thing that uses that
output is a ReLU or a clamp (ReLU6, Hardtanh), the new layer gets a copy of it in front (Net2Deeper: the deeper
network gains a nonlinearity, and since the activation is idempotent the function is unchanged); otherwise it goes
directly there, linear. Either way the new layer is the identity on what reaches it, so the function is exactly
unchanged; a new BatchNorm is the identity in eval mode only (in train mode it normalises by batch statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import commands as C
from ..errors import SteeringError
from ..graph import eager
from ..insertion import CONVS, INSERTED, chain_end, insert_after, inserted_layer_owner, odd_kernel
from ..optimizer import check_supported, insert_params, remove_params
from ..removal import remove

if TYPE_CHECKING:
    from ..engine import SteeringEngine

RELU_NODES = {"ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1"}
CLAMP_NODES = {"HardtanhBackward0", "HardtanhBackward1"}


@dataclass
class _Seen:
    """One eval-mode forward on the example input: per module its calls, output shape and output autograd node,
    and per output node the nodes that use it."""

    calls: dict[str, int] = field(default_factory=dict)
    out_shape: dict[str, tuple] = field(default_factory=dict)
    out_node: dict[str, object] = field(default_factory=dict)
    users: dict[int, list] = field(default_factory=dict)


def _observe(engine: SteeringEngine, op: str) -> _Seen:
    """Record every module's own output (hooks prepended: before the hooks that run inserted layers)."""
    module, x = engine.module, engine.example(op)
    names = {id(m): n for n, m in module.named_modules()}
    seen = _Seen()

    def hook(mod, inputs, output):
        name = names[id(mod)]
        seen.calls[name] = seen.calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            seen.out_shape[name] = tuple(output.shape)
            seen.out_node[name] = output.grad_fn

    handles = [m.register_forward_hook(hook, prepend=True) for m in module.modules()]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.enable_grad(), eager():
            out = module(x.detach().clone().requires_grad_(x.is_floating_point()))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    outs = [out] if isinstance(out, torch.Tensor) else list(out.values() if isinstance(out, dict) else out)
    stack = [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    visited: set[int] = set()
    while stack:  # users: who reads each node's output
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        for nxt, _ in node.next_functions:
            if nxt is not None:
                seen.users.setdefault(id(nxt), []).append(node)
                stack.append(nxt)
    return seen


def _only_user(seen: _Seen, name: str):
    node = seen.out_node.get(name)
    users = seen.users.get(id(node), []) if node is not None else []
    return users[0] if len(users) == 1 else None


def _idempotent(node) -> list | None:
    """The change-log spec of the activation ``node`` computes if applying it twice equals applying it once."""
    kind = type(node).__name__
    if kind in RELU_NODES:
        return ["relu"]
    if kind in CLAMP_NODES:
        return ["hardtanh", float(node._saved_min_val), float(node._saved_max_val)]
    return None


def _insertion_point(engine: SteeringEngine, name: str, op: str) -> tuple[str, str, list | None, _Seen]:
    """``(anchor, like, activation, seen)``: the module the new layers go after, the layer whose channels they
    take, and the activation copy they start with."""
    seen = _observe(engine, op)
    if seen.calls.get(name, 0) != 1:
        raise SteeringError(f"{op}: {name} is called {seen.calls.get(name, 0)} times in forward; need once (the new "
                            "layer would be shared by every call)")
    anchor = name
    user = _only_user(seen, name)
    for other, mod in engine.module.named_modules():
        if (isinstance(mod, _BatchNorm) and user is not None and seen.out_node.get(other) is user
                and seen.calls.get(other) == 1):
            anchor = other
    anchor, like = chain_end(engine.module, anchor, name)
    after = _only_user(seen, anchor)
    return anchor, like, (_idempotent(after) if after is not None else None), seen


def insert_layer(engine: SteeringEngine, args: dict):
    """Net2Deeper: an identity conv or Linear (and an eval-identity BatchNorm) after the layer ``after``; the
    anchor keeps its name, type and attributes (``insertion``).

    Preserves: the eval-mode function exactly (train mode differs only through a new BN's batch statistics), every
    old parameter, its name and its optimizer state.
    """
    op = "insert_layer"
    name = engine.layer_arg(args, "after", op)
    batchnorm = C.get_bool(args, "batchnorm", op, False)
    layer = engine.layer(name, op, (*CONVS, nn.Linear), "insert_layer needs a conv (1-D, 2-D or 3-D) or Linear layer")
    check_supported(engine.optimizers, f"{op} after {name}")
    anchor, like, activation, seen = _insertion_point(engine, name, op)
    shape = seen.out_shape.get(like, ())
    if batchnorm and isinstance(layer, nn.Linear) and len(shape) != 2:
        raise SteeringError(f"{op}: a BatchNorm after {name} needs its output to be [batch, features]; it is "
                            f"{list(shape)} (features last): insert it without batchnorm")
    entry = {"op": "insert_layer", "anchor": anchor, "like": like, "activation": activation,
             "batchnorm": batchnorm, "bn_dims": len(shape), "keeps_anchor": True}

    def body():
        container = insert_after(engine.module, entry)
        insert_params(engine.optimizers, engine.module, list(container.parameters()))
        return container

    container, delta, compiled = engine.structural(op, body)
    engine.changelog.append(dict(entry))
    inserted = [f"{anchor}.{INSERTED}.{key}" for key, m in container.named_children()
                if any(True for _ in m.parameters())]
    changes = {"after": name, "anchor": anchor, "inserted": inserted, "activation": activation,
               "kernel_size": list(odd_kernel(tuple(layer.kernel_size))) if isinstance(layer, CONVS) else None,
               "placement": (f"after a copy of the {activation[0]} that follows {anchor}" if activation
                             else f"directly after {anchor} (no ReLU or clamp follows it)"),
               "function_preserving_eval": True, "function_preserving_train": not batchnorm,
               "output_max_abs_change": delta, "compiler_reset": compiled}
    return True, changes, {}


def _check_removable(engine: SteeringEngine, name: str, op: str) -> None:
    mod = engine.module.get_submodule(name)
    if isinstance(mod, CONVS):
        if mod.in_channels != mod.out_channels:
            raise SteeringError(f"{op}: {name} maps {mod.in_channels} to {mod.out_channels} channels; only a layer "
                                "with in == out channels can be replaced by the identity")
        if any(k % 2 == 0 for k in mod.kernel_size):
            raise SteeringError(f"{op}: {name} has an even kernel {tuple(mod.kernel_size)}: it has no centre tap, so "
                                "no identity keeps its output's alignment")
    elif isinstance(mod, nn.Linear):
        if mod.in_features != mod.out_features:
            raise SteeringError(f"{op}: {name} maps {mod.in_features} to {mod.out_features} features; only a layer "
                                "with in == out features can be replaced by the identity")
    elif not isinstance(mod, _BatchNorm):
        raise SteeringError(f"{op}: layer {name!r} is a {type(mod).__name__}; remove_layer supports conv (1-D, 2-D "
                            "or 3-D), Linear and BatchNorm layers, and layers inserted by insert_layer")


def remove_layer(engine: SteeringEngine, args: dict):
    """Replace a layer by its identity (``removal``: a conv's centre tap, ``nn.Identity()`` for a Linear or a
    BatchNorm), or take out a layer ``insert_layer`` added; its parameters leave the optimizer.

    Preserves: every other parameter and its optimizer state, every other name; not the function in general
    (``output_max_abs_change`` says by how much it moved).
    """
    op = "remove_layer"
    name = engine.layer_arg(args, "layer", op)
    inserted = inserted_layer_owner(engine.module, name) is not None
    if not inserted:
        _check_removable(engine, name, op)
    check_supported(engine.optimizers, f"{op} {name}")
    kind = type(engine.module.get_submodule(name)).__name__

    def body():
        new, removed = remove(engine.module, name)
        remove_params(engine.optimizers, [p for m in removed for p in m.parameters(recurse=False)])
        return new, removed

    (new, removed), delta, compiled = engine.structural(op, body)
    for m in removed:
        engine.freezer.forget(m)
    engine.changelog.append({"op": "remove_layer", "layer": name})
    return True, {"layer": name, "removed": kind, "replaced_by": type(new).__name__ if new is not None else None,
                  "undid_insertion": inserted, "output_max_abs_change": delta,
                  "function_preserving": delta == 0.0, "compiler_reset": compiled}, {}
