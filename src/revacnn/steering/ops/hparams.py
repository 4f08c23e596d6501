"""``set_hparams``: new learning rate, momentum or weight decay for some or all param groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from revacnn.wire.ops import HPARAM_NAMES

from .. import commands as C
from ..errors import SteeringError
from ..optimizer import set_hparams as set_optimizer_hparams
from ..optimizer import validate_hparams

if TYPE_CHECKING:
    from ..engine import SteeringEngine

#: The group keys that follow a new lr by the same ratio (``optimizer.set_hparams``), and the schedulers' lists.
_LR_FOLLOWERS = ("initial_lr", "max_lr", "min_lr")
_SCHEDULER_LR_LISTS = ("base_lrs", "max_lrs")


def set_hparams(engine: SteeringEngine, args: dict):
    op = "set_hparams"
    values = {}
    for key in HPARAM_NAMES:
        if key in args:
            values[key] = C.get_float(args, key, op, minimum=0.0)
    if not values:
        raise SteeringError("set_hparams: give at least one of lr, momentum, weight_decay")
    if values.get("momentum", 0.0) >= 1.0:  # momentum 1 never forgets a gradient; above 1 every step grows
        raise SteeringError(f"set_hparams: momentum must be in [0, 1) (must be < 1, or the momentum buffer never "
                            f"decays), got {values['momentum']}")
    groups = C.get_int_list(args, "groups", op, what="param group") if "groups" in args else None
    validate_hparams(engine.optimizers, engine.schedulers, values, groups)
    check_representable(engine.optimizers, engine.schedulers, values, groups)
    return False, set_optimizer_hparams(engine.optimizers, engine.schedulers, values, groups), {}


def _group_dtypes(group: dict) -> list[torch.dtype]:
    return sorted({p.dtype for p in group["params"] if p.dtype.is_floating_point}, key=str)


def _scalars(opt, group: dict, gi: int, values: dict, schedulers) -> list[tuple[str, float]]:
    """The numbers the optimizer's next steps turn into scalars of the parameters' dtype, once ``values`` are set:
    lr and weight_decay (``param.add_(grad, alpha=-lr)``, ``grad.add(param, alpha=weight_decay)``), Adam's step
    size lr / (1 - betas[0]) (its first step on a parameter without state), and the lr a scheduler will set from
    its bases, which ``optimizer.set_hparams`` rescales by new lr / old lr."""
    lr = values.get("lr", group.get("lr"))
    out = [("lr", float(lr))] if "lr" in values else []
    if "weight_decay" in values:
        out.append(("weight_decay", values["weight_decay"]))
    if "betas" in group and ("lr" in values or "momentum" in values):
        beta1 = values.get("momentum", float(group["betas"][0]))
        out.append(("Adam's step size lr / (1 - betas[0])", float(lr) / (1.0 - beta1)))
    old = float(group["lr"])
    if "lr" in values and old > 0:
        ratio = values["lr"] / old
        for key in _LR_FOLLOWERS:
            if key in group:
                out.append((f"the group's {key} (rescaled with lr)", float(group[key]) * ratio))
        for sched in _schedulers_of(opt, schedulers):
            for key in _SCHEDULER_LR_LISTS:
                bases = getattr(sched, key, None)
                if isinstance(bases, list) and gi < len(bases):
                    out.append((f"{type(sched).__name__}.{key} (rescaled with lr)", float(bases[gi]) * ratio))
    return out


def _schedulers_of(opt, schedulers):
    """The schedulers driving ``opt``, including those inside SequentialLR and ChainedScheduler."""
    for sched in schedulers:
        if getattr(sched, "optimizer", None) is opt:
            yield sched
        yield from _schedulers_of(opt, getattr(sched, "_schedulers", None) or [])


def check_representable(optimizers, schedulers, values: dict, groups: list[int] | None) -> None:
    """Refuse values the parameters' dtype cannot hold: float64-finite is not enough, a float32 parameter's step
    raises "value cannot be converted to type float without overflow" for lr=1e39, a float16 one for lr=1e5."""
    for oi, opt in enumerate(optimizers):
        for gi, group in enumerate(opt.param_groups):
            if groups is not None and gi not in groups:
                continue
            for dtype in _group_dtypes(group):
                limit = torch.finfo(dtype).max
                for what, value in _scalars(opt, group, gi, values, schedulers):
                    if abs(value) > limit:
                        raise SteeringError(
                            f"set_hparams: {what} = {value:.3g} does not fit the {str(dtype).removeprefix('torch.')} "
                            f"parameters of param group {gi} of {type(opt).__name__} (optimizer {oi}); "
                            f"the largest {str(dtype).removeprefix('torch.')} is {limit:.4g}")
