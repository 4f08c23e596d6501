"""``set_hparams``: new learning rate, momentum or weight decay for some or all param groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

from revacnn.wire.ops import HPARAM_NAMES

from .. import commands as C
from ..errors import SteeringError
from ..optimizer import set_hparams as set_optimizer_hparams
from ..optimizer import validate_hparams

if TYPE_CHECKING:
    from ..engine import SteeringEngine


def set_hparams(engine: SteeringEngine, args: dict):
    op = "set_hparams"
    values = {}
    for key in HPARAM_NAMES:
        if key in args:
            values[key] = C.get_float(args, key, op, minimum=0.0)
    if not values:
        raise SteeringError("set_hparams: give at least one of lr, momentum, weight_decay")
    groups = C.get_int_list(args, "groups", op, what="param group") if "groups" in args else None
    validate_hparams(engine.optimizers, engine.schedulers, values, groups)
    return False, set_optimizer_hparams(engine.optimizers, engine.schedulers, values, groups), {}
