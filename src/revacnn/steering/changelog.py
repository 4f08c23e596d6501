"""The change log: every applied structural change as a plain-typed dict, and replaying it on a fresh model.

Entries (plain str/int/float/bool/list/dict only, so ``torch.load(weights_only=True)`` reads them):

- ``{"op": "widen" | "remove_filters", "layer", "producers", "batchnorms", "readers": [[name, hw]], "index",
  "in_scale", "state_scale", ...}`` — ``index[j]`` is the old channel new channel j comes from;
- ``{"op": "insert_layer", "anchor", "like", "relu", "batchnorm"}``;
- ``{"op": "remove_layer", "layer"}``.

Replaying reproduces shapes and module structure exactly (values are then overwritten by the saved state_dict).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import SteeringError
from .surgery import resize_channels, splice_insert, splice_remove

NAME_FIELDS = ("layer", "anchor", "like")
NAME_LISTS = ("producers", "batchnorms")


def _strip(entry: dict, prefix: str) -> dict:
    def cut(name: str) -> str:
        if not name.startswith(prefix):
            raise SteeringError(f"change-log layer {name!r} does not start with prefix {prefix!r}")
        return name[len(prefix):]

    out = dict(entry)
    for key in NAME_FIELDS:
        if key in out:
            out[key] = cut(out[key])
    for key in NAME_LISTS:
        if key in out:
            out[key] = [cut(n) for n in out[key]]
    if "readers" in out:
        out["readers"] = [[cut(n), hw] for n, hw in out["readers"]]
    return out


def replay_changelog(module: nn.Module, changelog: list[dict], prefix: str = "") -> nn.Module:
    """Re-apply the structural changes of ``changelog`` to a freshly built ``module`` (in order, deterministic).

    ``prefix`` is stripped from every layer name (e.g. ``"net."`` to replay a LightningModule's log on its bare net).
    """
    for i, entry in enumerate(changelog):
        if prefix:
            entry = _strip(entry, prefix)
        op = entry.get("op")
        try:
            if op in ("widen", "remove_filters"):
                resize_channels(module, entry)
            elif op == "insert_layer":
                splice_insert(module, entry)
            elif op == "remove_layer":
                splice_remove(module, entry["layer"])
            else:
                raise SteeringError(f"change-log entry {i} has unknown op {op!r}")
        except (AttributeError, KeyError, IndexError, RuntimeError) as exc:
            raise SteeringError(f"cannot replay change-log entry {i} ({op}): {exc}") from exc
    return module


def load_steered(checkpoint: Any, module: nn.Module, strict: bool = True) -> nn.Module:
    """Load a (Lightning) checkpoint of a steered model into a freshly built ``module`` of the original class.

    Reads the file with ``torch.load(weights_only=True)``, replays ``checkpoint["revacnn"]["changelog"]`` and loads
    ``checkpoint["state_dict"]``. ``module`` may be the LightningModule or the bare net it wraps (a common first
    name component of the saved keys that ``module`` lacks, such as ``net.``, is stripped).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise SteeringError("checkpoint must be a path or a dict")
    changelog = (checkpoint.get("revacnn") or {}).get("changelog", [])
    state = checkpoint.get("state_dict", checkpoint)
    prefix = ""
    firsts = {k.split(".", 1)[0] for k in state}
    if len(firsts) == 1:
        first = next(iter(firsts))
        if not hasattr(module, first):
            prefix = first + "."
            state = {k[len(prefix):]: v for k, v in state.items()}
    replay_changelog(module, changelog, prefix=prefix)
    module.load_state_dict(state, strict=strict)
    return module
