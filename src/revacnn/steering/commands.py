"""Command validation: plain-dict commands → checked, normalised arguments, or a :class:`SteeringError`.

The envelope (id, op, args) is the wire's and checked by ``revacnn.wire.protocol.command_envelope``; here only the
op and the *shapes* of its fields (types, ranges that need no model). Checks that need the model (layer exists,
index < channel count, coupling supported) live next to the operation, but always run before anything changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from revacnn.wire.ops import ENGINE_OPS, HPARAM_NAMES, SET_HPARAMS
from revacnn.wire.protocol import ProtocolError, command_envelope

from .errors import SteeringError

# op -> (required fields, optional fields)
FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "freeze": (set(), {"layers", "layer", "filters"}),
    "unfreeze": (set(), {"layers", "layer", "filters"}),
    SET_HPARAMS: (set(), {*HPARAM_NAMES, "groups"}),
    "widen": ({"layer", "count"}, {"init", "split", "seed", "allow_inexact"}),
    "remove_filters": ({"layer", "filters"}, set()),
    "insert_layer": ({"after"}, {"batchnorm"}),
    "remove_layer": ({"layer"}, set()),
    "reinit_filters": ({"layer", "filters", "mode"}, {"neighbours", "distances", "values", "seed"}),
}


def parse_command(command: Any) -> tuple[str, str, dict]:
    """Check the envelope (``revacnn.wire.protocol.command_envelope``), that the op is one of the engine's, and
    the argument names of the op."""
    try:
        cid, op, args = command_envelope(command)
    except ProtocolError as error:
        raise SteeringError(error.detail) from None
    if op not in ENGINE_OPS:
        raise SteeringError(f"unknown op {op!r}; known ops: {', '.join(ENGINE_OPS)}")
    required, optional = FIELDS[op]
    missing = sorted(required - set(args))
    if missing:
        raise SteeringError(f"{op}: missing required field(s) {', '.join(missing)}")
    unknown = sorted(set(args) - required - optional)
    if unknown:
        raise SteeringError(f"{op}: unknown field(s) {', '.join(map(str, unknown))}; allowed: "
                            f"{', '.join(sorted(required | optional))}")
    return cid, op, args


def get_str(args: Mapping, key: str, op: str) -> str:
    value = args[key]
    if not isinstance(value, str) or not value:
        raise SteeringError(f"{op}: field '{key}' must be a non-empty string (a layer name), got {value!r}")
    return value


def get_bool(args: Mapping, key: str, op: str, default: bool) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise SteeringError(f"{op}: field '{key}' must be true or false, got {value!r}")
    return value


def get_int(args: Mapping, key: str, op: str, default: int | None = None, minimum: int | None = None) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SteeringError(f"{op}: field '{key}' must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SteeringError(f"{op}: field '{key}' must be >= {minimum}, got {value}")
    return value


def get_float(args: Mapping, key: str, op: str, minimum: float = 0.0, strict: bool = False) -> float:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SteeringError(f"{op}: field '{key}' must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64 (10**400)
        value = math.inf
    if not math.isfinite(value):
        raise SteeringError(f"{op}: field '{key}' must be finite, got {value}")
    if value < minimum or (strict and value == minimum):
        raise SteeringError(f"{op}: field '{key}' must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def get_choice(args: Mapping, key: str, op: str, choices: tuple[str, ...]) -> str:
    value = args.get(key, choices[0])
    if value not in choices or not isinstance(value, str):
        raise SteeringError(f"{op}: field '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def get_int_list(args: Mapping, key: str, op: str, *, upper: int | None = None, what: str = "index",
                 allow_empty: bool = False, unique: bool = True) -> list[int]:
    """A list of ints, each in ``[0, upper)`` when ``upper`` is given, without duplicates."""
    value = args[key]
    if not isinstance(value, (list, tuple)):
        raise SteeringError(f"{op}: field '{key}' must be a list of integers, got {type(value).__name__}")
    if not value and not allow_empty:
        raise SteeringError(f"{op}: field '{key}' must not be empty")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise SteeringError(f"{op}: field '{key}' must contain integers only, got {item!r}")
        if item < 0 or (upper is not None and item >= upper):
            raise SteeringError(f"{op}: {what} {item} in '{key}' is out of range [0, {upper})"
                                if upper is not None else f"{op}: {what} {item} in '{key}' is negative")
        out.append(item)
    if unique and len(set(out)) != len(out):
        dupes = sorted({i for i in out if out.count(i) > 1})
        raise SteeringError(f"{op}: duplicate {what}(s) {dupes} in '{key}'")
    return out


def get_name_list(args: Mapping, key: str, op: str) -> list[str]:
    value = args[key]
    if not isinstance(value, (list, tuple)) or not value:
        raise SteeringError(f"{op}: field '{key}' must be a non-empty list of layer names, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise SteeringError(f"{op}: field '{key}' must contain layer names (strings), got {item!r}")
    if len(set(value)) != len(value):
        raise SteeringError(f"{op}: duplicate layer names in '{key}'")
    return list(value)
