"""The change log: every applied structural change as a plain-typed dict, and replaying it on a fresh model.

Entries (plain str/int/float/bool/list/dict only, so ``torch.load(weights_only=True)`` reads them):

- ``{"op": "widen" | "remove_filters", "layer", "channels", "producers", "batchnorms", "norms", "channelwise",
  "scales": [[parameter, dim]], "readers": [[name, hw, offset]], "index", "in_scale", "state_scale", ...}`` —
  ``index[j]`` is the old channel new channel j comes from (entries written before ``norms``, ``channelwise``,
  ``scales``, ``channels`` and reader offsets existed replay as before: those are optional);
- ``{"op": "insert_layer", "anchor", "like", "activation", "batchnorm", "bn_dims", "keeps_anchor": true}``
  (``insertion.insert_after``); entries without ``keeps_anchor`` (``"relu"`` instead of ``"activation"``) come
  from earlier versions, which moved the anchor into a Sequential, and replay that way;
- ``{"op": "remove_layer", "layer"}`` (``removal.remove``).

Replaying reproduces shapes and module structure exactly (values are then overwritten by the saved state_dict).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import CheckpointMismatch, SteeringError
from .insertion import insert_after, legacy_sequential
from .removal import remove
from .surgery import resize_channels

NAME_FIELDS = ("layer", "anchor", "like")
NAME_LISTS = ("producers", "batchnorms", "norms", "channelwise")


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
        out["readers"] = [[cut(reader[0]), *reader[1:]] for reader in out["readers"]]
    if "scales" in out:
        out["scales"] = [[cut(name), dim] for name, dim in out["scales"]]
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
                (insert_after if entry.get("keeps_anchor") else legacy_sequential)(module, entry)
            elif op == "remove_layer":
                remove(module, entry["layer"])
            else:
                raise SteeringError(f"change-log entry {i} has unknown op {op!r}")
        except (AttributeError, KeyError, IndexError, RuntimeError) as exc:
            raise SteeringError(f"cannot replay change-log entry {i} ({op}): {exc}") from exc
    return module


def _shape(value: Any) -> str:
    return str(list(getattr(value, "shape", ())))


def explain_mismatch(module: nn.Module, state: dict[str, Any], changelog: list[dict], strict: bool = True,
                     to: str = "the module") -> str | None:
    """Why ``state`` does not load into ``module`` once ``changelog`` was replayed on it, and what to do; None
    when it fits (no size mismatch, and with ``strict`` the same names)."""
    own = module.state_dict()
    sizes = [f"{key} is {_shape(state[key])} in the checkpoint, {_shape(value)} in {to}"
             for key, value in own.items() if key in state and getattr(state[key], "shape", None) is not None
             and getattr(value, "shape", None) is not None and tuple(state[key].shape) != tuple(value.shape)]
    missing = [key for key in own if key not in state] if strict else []
    unexpected = [key for key in state if key not in own] if strict else []
    if not (sizes or missing or unexpected):
        return None
    details = sizes[:3] + [f"missing {key}" for key in missing[:3]] + [f"unexpected {key}" for key in unexpected[:3]]
    more = len(sizes) + len(missing) + len(unexpected) - len(details)
    what = (f"after replaying its {len(changelog)} structural change(s)" if changelog
            else "(the checkpoint holds no revacnn change log: it was saved before any structural change, or "
                 "not through a Lightning checkpoint of the run)")
    compiled_saved = any("._orig_mod." in f".{key}" for key in state)
    compiled_here = any("._orig_mod." in f".{key}" for key in own)
    if compiled_saved != compiled_here:
        hint = ("the checkpoint's names " + ("have" if compiled_saved else "lack") + " torch.compile's '_orig_mod.': "
                + ("compile" if compiled_saved else "do not compile") + " the net before loading, as in the run")
    else:
        hint = ("build the module the way the trained model was built before it was steered: the same class with "
                "the same arguments (the change log replays only the steering on top of it)")
    return (f"the checkpoint's weights do not fit {to} {what}: {'; '.join(details)}"
            + (f" (and {more} more)" if more > 0 else "") + f". {hint}")


def load_steered(checkpoint: Any, module: nn.Module, strict: bool = True) -> nn.Module:
    """Load a (Lightning) checkpoint of a steered model into a freshly built ``module`` of the original class.

    Reads the file with ``torch.load(weights_only=True)``, replays ``checkpoint["revacnn"]["changelog"]`` and loads
    ``checkpoint["state_dict"]``. ``module`` may be the LightningModule or the bare net it wraps (a common first
    name component of the saved keys that ``module`` lacks, such as ``net.``, is stripped). Weights that still do
    not fit raise ``CheckpointMismatch`` (a ``SteeringError`` and a ``RuntimeError``), saying which and what to do.
    What ``freeze`` froze (``checkpoint["revacnn"]["frozen"]``) is not applied: it needs the optimizer's step hooks
    of a training run (the callback freezes it again when a fit resumes from the checkpoint).
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
    problem = explain_mismatch(module, state, changelog, strict, f"the {type(module).__name__} given")
    if problem is not None:
        raise CheckpointMismatch(f"load_steered: {problem}")
    module.load_state_dict(state, strict=strict)
    return module
