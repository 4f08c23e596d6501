"""``freeze`` and ``unfreeze``: whole layers, or single filters of a conv or Linear layer.

Preserves: every weight value; frozen weights and their optimizer state stay bitwise unchanged while frozen
(``FreezeManager``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .. import commands as C
from ..errors import SteeringError
from ..graph import FILTER_LAYERS
from ..insertion import own_named_parameters
from ..optimizer import locate

if TYPE_CHECKING:
    from ..engine import SteeringEngine


def _targets(engine: SteeringEngine, args: dict, op: str):
    """``([(name, module)], None)`` for whole layers, or ``([(name, layer)], filters)`` for filters of one."""
    if "layers" in args:
        if "layer" in args or "filters" in args:
            raise SteeringError(f"{op}: give either 'layers' or 'layer' with 'filters', not both")
        names = [engine.resolve(n, op) for n in C.get_name_list(args, "layers", op)]
        mods = []
        for n in names:
            mod = engine.layer(n, op)
            if not own_named_parameters(mod):
                raise SteeringError(f"{op}: layer {n!r} ({type(mod).__name__}) has no parameters")
            mods.append((n, mod))
        return mods, None
    if "layer" not in args or "filters" not in args:
        raise SteeringError(f"{op}: needs 'layers' (a list of names) or 'layer' with 'filters'")
    name = engine.layer_arg(args, "layer", op)
    layer = engine.layer(name, op, FILTER_LAYERS,
                         "single filters can be (un)frozen only in a conv (1-D, 2-D or 3-D) or Linear layer")
    engine.check_held_weights(name, op)
    filters = C.get_int_list(args, "filters", op, upper=layer.weight.shape[0], what="filter")
    return [(name, layer)], filters


def freeze(engine: SteeringEngine, args: dict):
    mods, filters = _targets(engine, args, "freeze")
    if filters is None:
        for _, mod in mods:
            engine.freezer.freeze_layer(mod)
    else:
        engine.freezer.freeze_filters(mods[0][1], filters)
    return False, {"frozen": engine.frozen(), "mode": "grad_none" if engine.distributed else "requires_grad"}, {}


def unfreeze(engine: SteeringEngine, args: dict):
    mods, filters = _targets(engine, args, "unfreeze")
    not_frozen, by_module = [], []
    if filters is None:
        by_module = [(n, mod) for n, mod in mods if _frozen_by_module(engine, n, mod)]  # checked before any change
        for n, mod in mods:
            if (n, mod) in by_module:
                for _, param in own_named_parameters(mod):
                    param.requires_grad_(True)
            elif not engine.freezer.unfreeze_layer(mod) and mod not in engine.freezer.filters:
                not_frozen.append(n)
            engine.freezer.filters.pop(mod, None)
    else:
        removed = engine.freezer.unfreeze_filters(mods[0][1], filters)
        not_frozen = [f for f in filters if f not in removed]
    return False, {"frozen": engine.frozen(), "were_not_frozen": not_frozen,
                   "were_frozen_by_the_module": [n for n, _ in by_module]}, {}


def _frozen_by_module(engine: SteeringEngine, name: str, mod: nn.Module) -> bool:
    """Whether ``mod`` was frozen by the user's own code (no parameter requires a gradient, and not by a
    ``freeze``), e.g. a fine-tuning backbone; raises if unfreezing it would not make it train."""
    params = [p for _, p in own_named_parameters(mod)]
    if mod in engine.freezer.layers or any(p.requires_grad for p in params):
        return False
    if engine.distributed:
        raise SteeringError(f"unfreeze: {name} was frozen by the module (requires_grad=False) before DDP wrapped "
                            "it; DDP synchronises only the parameters that required a gradient then, so it "
                            "cannot be unfrozen during this run")
    outside = [p for p in params if locate(engine.optimizers, p) is None]
    if outside:
        raise SteeringError(f"unfreeze: {name} was frozen by the module (requires_grad=False) and "
                            f"{len(outside)} of its {len(params)} parameters are in no optimizer (configure_"
                            "optimizers left them out), so unfreezing it would not train it")
    return True
