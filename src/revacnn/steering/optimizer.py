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
from .surgery import select, select_in_channels

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


def transform_state(state: dict, old: torch.Tensor, dim: int, index: list[int], state_scale, groups: int = 1) -> dict:
    """New per-parameter state: tensors shaped like ``old`` are re-indexed along ``dim`` (slice j = old slice
    index[j], times state_scale[j], squared for second moments; ``groups`` > 1: the input channels of a grouped
    conv's weight, as the weight itself, ``surgery.select_in_channels``); scalars such as ``step`` are kept.

    Preserves: every slice whose scale is 1 bitwise (in particular all old slices)."""
    new = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() > 0:
            scale = state_scale
            if scale is not None and key in SQUARED:
                scale = [s * s for s in scale]
            new[key] = (select_in_channels(value, groups, index, scale) if groups > 1
                        else select(value, dim, index, scale))
        else:
            new[key] = value
    return new


def apply_records(optimizers, records) -> None:
    """Swap each ``old`` parameter for ``new`` in every optimizer holding it, carrying the state over."""
    for old, new, dim, index, state_scale, groups in records:
        where = locate(optimizers, old)
        if where is None:
            continue
        opt, group, i = where
        group["params"][i] = new
        if old in opt.state:
            opt.state[new] = transform_state(opt.state.pop(old), old, dim, index, state_scale, groups)


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
    """Add new parameters (an inserted layer's) to the optimizer group a ``configure_optimizers`` would most likely
    put them in, keeping each group in module order; fresh (empty) state.

    Each new parameter joins the group of the nearest existing parameter in the same role: the same local name
    (``weight``, ``bias``) in a module of the same type, nearest in ``module.parameters()`` order — the conv it was
    inserted after for a new conv, an existing BatchNorm for a new BatchNorm. So the usual groupings carry over
    (no weight decay on biases and norm parameters, by name or by ndim; a lower lr for a backbone than a head), and
    the optimizer that ``configure_optimizers`` builds on resume has the same groups as the saved state. Where the
    model holds no parameter in that role (a BatchNorm inserted into a model without one), it joins the group of
    the parameter before it. Within its group it goes after the last member that precedes it in module order.
    """
    if not optimizers:
        return
    order = list(module.parameters())
    position = {id(p): i for i, p in enumerate(order)}
    role = {id(p): (type(owner), local) for owner in module.modules()
            for local, p in owner.named_parameters(recurse=False)}
    for p in new_params:
        pos = position[id(p)]
        held = [(q, where[1]) for q in order if q is not p for where in [locate(optimizers, q)] if where is not None]
        alike = [(q, group) for q, group in held if role[id(q)] == role[id(p)]]
        before = [(q, group) for q, group in held if position[id(q)] < pos]
        if alike:  # the nearest, the earlier one on a tie
            group = min(alike, key=lambda item: (abs(position[id(item[0])] - pos), position[id(item[0])]))[1]
        elif before:
            group = before[-1][1]
        elif held:
            group = held[0][1]
        else:
            group = optimizers[0].param_groups[0]
        preceding = [i for i, q in enumerate(group["params"]) if position.get(id(q), -1) < pos]
        group["params"].insert(preceding[-1] + 1 if preceding else 0, p)


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
                if group.get("nesterov") and values["momentum"] <= 0:
                    raise SteeringError("set_hparams: Nesterov SGD needs momentum > 0")
            if "weight_decay" in values and "weight_decay" not in group:
                raise SteeringError(f"set_hparams: {type(opt).__name__} has no weight_decay")
            for key in ("lr", "momentum"):
                if key in values and isinstance(group.get(key), torch.Tensor):
                    raise SteeringError(f"set_hparams: {key} is a tensor in {type(opt).__name__}; not supported")


def _ratio(new: float, old: float) -> float | None:
    return None if old == 0 or not math.isfinite(old) else new / old


def _every_scheduler(schedulers):
    """The schedulers, and the ones inside SequentialLR and ChainedScheduler (which compute from their own)."""
    for sched in schedulers:
        yield sched
        yield from _every_scheduler(getattr(sched, "_schedulers", None) or [])


def _rescale(sched, keys: tuple[str, ...], gi: int, ratio: float | None, new: float) -> None:
    """Scale a scheduler's per-group values (``base_lrs`` …) for group ``gi`` by ``ratio``, or set them to ``new``."""
    for key in keys:
        values = getattr(sched, key, None)
        if isinstance(values, list) and gi < len(values):
            values[gi] = values[gi] * ratio if ratio is not None else new


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
                for sched in _every_scheduler(schedulers):
                    if getattr(sched, "optimizer", None) is not opt:
                        continue
                    _rescale(sched, ("base_lrs", "max_lrs"), gi, ratio, new)  # max_lrs: CyclicLR's peaks
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
                for sched in _every_scheduler(schedulers):  # CyclicLR cycles momentum from its own lists
                    if getattr(sched, "optimizer", None) is opt:
                        _rescale(sched, ("base_momentums", "max_momentums"), gi, ratio, new)
                entry["momentum"] = [old, new]
            if "weight_decay" in values:
                entry["weight_decay"] = [float(group["weight_decay"]), values["weight_decay"]]
                group["weight_decay"] = values["weight_decay"]
            changed.append(entry)
    return {"groups": changed}
