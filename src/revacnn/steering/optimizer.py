"""Optimizer surgery and hyper-parameters, always in place (schedulers and Lightning wrappers hold references).

Surgery replaces the parameter object inside ``param_groups`` at the same position, re-keys ``optimizer.state``,
re-indexes every state tensor shaped like the parameter and keeps scalars (Adam's ``step``), so no stale keys are
left and ``optimizer.state_dict()`` keeps working.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import SteeringError
from .surgery import select

SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)
SQUARED = {"exp_avg_sq", "max_exp_avg_sq", "square_avg"}  # second-moment state: scaled by the square


def check_supported(optimizers, action: str) -> None:
    for opt in optimizers:
        if not isinstance(opt, SUPPORTED):
            raise SteeringError(f"cannot {action}: optimizer {type(opt).__name__} is not supported for structural "
                                f"changes (supported: SGD, Adam, AdamW, RMSprop); its state could not be carried over")


def locate(optimizers, param) -> tuple | None:
    for opt in optimizers:
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                if p is param:
                    return opt, group, i
    return None


def transform_state(state: dict, old: torch.Tensor, dim: int, index: list[int], state_scale) -> dict:
    """New per-parameter state: tensors shaped like ``old`` are re-indexed along ``dim`` (slice j = old slice
    index[j], times state_scale[j], squared for second moments); scalars such as ``step`` are kept.

    Preserves: every slice whose scale is 1 bitwise (in particular all old slices)."""
    new = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() > 0:
            scale = state_scale
            if scale is not None and key in SQUARED:
                scale = [s * s for s in scale]
            new[key] = select(value, dim, index, scale)
        else:
            new[key] = value
    return new


def apply_records(optimizers, records) -> None:
    """Swap each ``old`` parameter for ``new`` in every optimizer holding it, carrying the state over."""
    for old, new, dim, index, state_scale in records:
        where = locate(optimizers, old)
        if where is None:
            continue
        opt, group, i = where
        group["params"][i] = new
        if old in opt.state:
            opt.state[new] = transform_state(opt.state.pop(old), old, dim, index, state_scale)


def reset_state_rows(optimizers, param, rows: list[int]) -> None:
    """Zero the optimizer state of the given output rows of ``param`` (scalars such as ``step`` are kept)."""
    where = locate(optimizers, param)
    if where is None:
        return
    opt = where[0]
    for key, value in opt.state.get(param, {}).items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[rows] = 0


def remove_params(optimizers, params) -> None:
    ids = {id(p) for p in params}
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for p in [p for p in opt.state if id(p) in ids]:
            del opt.state[p]


def insert_params(optimizers, module: nn.Module, new_params) -> None:
    """Add new parameters to the group holding their nearest predecessor in ``module.parameters()`` order, right
    after it (so a group that held all parameters in module order still does); fresh (empty) state."""
    if not optimizers:
        return
    order = list(module.parameters())
    new_ids = {id(p) for p in new_params}
    for p in new_params:
        pos = next(i for i, q in enumerate(order) if q is p)
        placed = False
        for q in reversed(order[:pos]):
            where = locate(optimizers, q)
            if where is not None:
                where[1]["params"].insert(where[2] + 1, p)
                placed = True
                break
        if not placed:
            for q in order[pos + 1:]:
                if id(q) in new_ids:
                    continue
                where = locate(optimizers, q)
                if where is not None:
                    where[1]["params"].insert(where[2], p)
                    placed = True
                    break
        if not placed:
            optimizers[0].param_groups[0]["params"].append(p)


# ----------------------------------------------------------------------------------------------- hyper-parameters

def validate_hparams(optimizers, schedulers, values: dict, groups: list[int] | None) -> None:
    if not optimizers:
        raise SteeringError("set_hparams: no optimizer to change")
    for opt in optimizers:
        n = len(opt.param_groups)
        for g in groups or []:
            if g >= n:
                raise SteeringError(f"set_hparams: param group {g} does not exist ({type(opt).__name__} has {n})")
        for gi, group in enumerate(opt.param_groups):
            if groups is not None and gi not in groups:
                continue
            if "momentum" in values:
                if "betas" not in group and "momentum" not in group:
                    raise SteeringError(f"set_hparams: {type(opt).__name__} has no momentum")
                if "betas" in group and values["momentum"] >= 1.0:
                    raise SteeringError(f"set_hparams: momentum (betas[0]) must be < 1 for {type(opt).__name__}, "
                                        f"got {values['momentum']}")
                if group.get("nesterov") and values["momentum"] <= 0:
                    raise SteeringError("set_hparams: Nesterov SGD needs momentum > 0")
            if "weight_decay" in values and "weight_decay" not in group:
                raise SteeringError(f"set_hparams: {type(opt).__name__} has no weight_decay")
            for key in ("lr", "momentum"):
                if key in values and isinstance(group.get(key), torch.Tensor):
                    raise SteeringError(f"set_hparams: {key} is a tensor in {type(opt).__name__}; not supported")


def _ratio(new: float, old: float) -> float | None:
    return None if old == 0 or not math.isfinite(old) else new / old


def set_hparams(optimizers, schedulers, values: dict, groups: list[int] | None) -> dict:
    """Set lr / momentum / weight_decay now, and rescale schedulers' bases so they continue from the new value."""
    changed = []
    for oi, opt in enumerate(optimizers):
        for gi, group in enumerate(opt.param_groups):
            if groups is not None and gi not in groups:
                continue
            entry = {"optimizer": oi, "group": gi}
            if "lr" in values:
                old, new = float(group["lr"]), values["lr"]
                ratio = _ratio(new, old)
                group["lr"] = new
                for key in ("initial_lr", "max_lr", "min_lr"):
                    if key in group:
                        group[key] = group[key] * ratio if ratio is not None else new
                for sched in schedulers:
                    if getattr(sched, "optimizer", None) is not opt:
                        continue
                    if hasattr(sched, "base_lrs"):
                        sched.base_lrs[gi] = sched.base_lrs[gi] * ratio if ratio is not None else new
                    if getattr(sched, "_last_lr", None) is not None:
                        sched._last_lr[gi] = new
                entry["lr"] = [old, new]
            if "momentum" in values:
                new = values["momentum"]
                if "betas" in group:
                    old = float(group["betas"][0])
                    group["betas"] = (new, group["betas"][1])
                else:
                    old = float(group["momentum"])
                    group["momentum"] = new
                ratio = _ratio(new, old)
                for key in ("max_momentum", "base_momentum"):  # OneCycleLR with cycle_momentum
                    if key in group:
                        group[key] = group[key] * ratio if ratio is not None else new
                entry["momentum"] = [old, new]
            if "weight_decay" in values:
                entry["weight_decay"] = [float(group["weight_decay"]), values["weight_decay"]]
                group["weight_decay"] = values["weight_decay"]
            changed.append(entry)
    return {"groups": changed}
