"""``insert_layer`` and ``remove_layer``: splice a whole layer into or out of the network, with its parameters
into or out of the optimizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.nn.modules.batchnorm import _BatchNorm

from .. import commands as C
from ..errors import SteeringError
from ..graph import CONVS
from ..optimizer import check_supported, insert_params, remove_params
from ..surgery import splice_insert, splice_remove

if TYPE_CHECKING:
    from ..engine import SteeringEngine

RELU_NODES = {"ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1"}


def _insertion_point(engine: SteeringEngine, name: str, op: str) -> tuple[str, bool]:
    """``(anchor, relu)``: the module the new layer goes after (the conv, or the BatchNorm that follows it) and
    whether a ReLU follows the anchor (the new layer then goes after that ReLU)."""
    t = engine.trace(op)
    if t.calls.get(name, 0) != 1:
        raise SteeringError(f"insert_layer: {name} is called {t.calls.get(name, 0)} times in forward; need once")
    followers = t.followers.get(name, [])
    fmods = t.follower_modules.get(name, [])
    if len(followers) == 1 and followers[0] in RELU_NODES:
        return name, True
    if (len(followers) == 1 and len(fmods) == 1 and isinstance(engine.module.get_submodule(fmods[0]), _BatchNorm)
            and t.calls.get(fmods[0]) == 1 and len(t.followers.get(fmods[0], [])) == 1
            and t.followers[fmods[0]][0] in RELU_NODES):
        return fmods[0], True
    return name, False


def insert_layer(engine: SteeringEngine, args: dict):
    """Net2Deeper: an identity conv (and an eval-identity BatchNorm) after the conv block ``after``.

    Preserves: the eval-mode function (train mode differs only through the new BN's batch statistics), every old
    parameter and its optimizer state (renamed ``<anchor>.0.*``).
    """
    op = "insert_layer"
    name = engine.layer_arg(args, "after", op)
    batchnorm = C.get_bool(args, "batchnorm", op, False)
    conv = engine.layer(name, op, CONVS, "insert_layer needs a conv layer (1-D, 2-D or 3-D)")
    check_supported(engine.optimizers, f"{op} after {name}")
    if conv.groups != 1:
        raise SteeringError(f"insert_layer: {name} is a grouped/depthwise conv (groups={conv.groups}); unsupported")
    if any(k % 2 == 0 for k in conv.kernel_size):
        raise SteeringError(f"insert_layer: {name} has an even kernel {conv.kernel_size}; an identity conv of "
                            "that size has no centre tap")
    anchor, relu = _insertion_point(engine, name, op)
    entry = {"op": "insert_layer", "anchor": anchor, "like": name, "relu": relu, "batchnorm": batchnorm}

    def body():
        seq = splice_insert(engine.module, entry)
        new = [p for m in list(seq)[1:] for p in m.parameters()]
        insert_params(engine.optimizers, engine.module, new)
        return seq

    seq, delta, compiled = engine.structural(op, body)
    engine.changelog.append(dict(entry))
    inserted = [f"{anchor}.{i}" for i, m in enumerate(seq) if i > 0 and any(True for _ in m.parameters())]
    changes = {"after": name, "anchor": anchor, "renamed": {anchor: anchor + ".0"}, "inserted": inserted,
               "placement": "after the ReLU that follows" if relu else "directly after the conv (linear)",
               "function_preserving_eval": True, "output_max_abs_change": delta, "compiler_reset": compiled}
    return True, changes, {}


def _check_removable_conv(engine: SteeringEngine, name: str, mod, op: str) -> None:
    if mod.groups != 1:
        raise SteeringError(f"remove_layer: {name} is a grouped/depthwise conv (groups={mod.groups}); only an "
                            "ungrouped layer with in == out channels can be removed")
    if mod.in_channels != mod.out_channels:
        raise SteeringError(f"remove_layer: {name} maps {mod.in_channels} to {mod.out_channels} channels; "
                            "only a layer with in == out channels can be removed")
    t = engine.trace(op)
    if t.calls.get(name, 0) != 1:
        raise SteeringError(f"remove_layer: {name} is called {t.calls.get(name, 0)} times in forward")
    if t.in_shape[name] != t.out_shape[name]:
        raise SteeringError(f"remove_layer: {name} changes the feature map shape {list(t.in_shape[name])} → "
                            f"{list(t.out_shape[name])}; only shape-preserving layers can be removed")


def remove_layer(engine: SteeringEngine, args: dict):
    """Replace a shape-preserving conv or a BatchNorm with ``nn.Identity()``; its parameters leave the optimizer.

    Preserves: every other parameter and its optimizer state; not the function in general
    (``output_max_abs_change`` says by how much it moved).
    """
    op = "remove_layer"
    name = engine.layer_arg(args, "layer", op)
    mod = engine.layer(name, op, (*CONVS, _BatchNorm),
                       "remove_layer supports conv (1-D, 2-D or 3-D) and BatchNorm layers")
    if isinstance(mod, CONVS):
        _check_removable_conv(engine, name, mod, op)

    def body():
        old = splice_remove(engine.module, name)
        remove_params(engine.optimizers, list(old.parameters()))
        return old

    old, delta, compiled = engine.structural(op, body)
    for m in old.modules():
        engine.freezer.forget(m)
    engine.changelog.append({"op": "remove_layer", "layer": name})
    return True, {"layer": name, "removed": type(old).__name__, "output_max_abs_change": delta,
                  "function_preserving": False, "compiler_reset": compiled}, {}
