"""What a command did, in words, for the event log's detail column: the filters a ``done`` widen added (their indices
and ids), the new learning rate, the epoch a batch size took effect at; and what a ``queued`` command waits for."""

from __future__ import annotations

from typing import Any

from revacnn.wire.acks import DONE, QUEUED
from revacnn.wire.ops import FREEZE_OPS, HPARAM_NAMES, SET_BATCH_SIZE, SET_HPARAMS

#: Ops a trainer applies later than it queues them, and when (docs/protocol.md).
DEFERRED = {SET_BATCH_SIZE: "takes effect at the next epoch"}


def ack_detail(event: dict[str, Any], structure: dict[str, Any] | None = None) -> str:
    """The detail of one event (``Event.as_dict``): its error, else what its ack says changed (``structure``, the
    run's current one, names the ids of filters a widen added), else its note."""
    if event.get("error"):
        return str(event["error"])
    status, op = event.get("status"), event.get("op")
    if status == QUEUED and op in DEFERRED:
        return DEFERRED[op]
    if status == DONE:
        text = done_text(op, event.get("result") or {}, event.get("args") or {}, structure)
        if text:
            return f"{text} · {event['note']}" if event.get("note") else text
    return str(event.get("note") or "")


def done_text(op: str, result: dict[str, Any], args: dict[str, Any], structure: dict[str, Any] | None) -> str:
    if result.get("already_applied"):
        return "already applied (sent again)"
    changes = result.get("changes") if isinstance(result.get("changes"), dict) else {}
    if op == SET_HPARAMS:
        return hparams_text(changes.get("groups"))
    if op == SET_BATCH_SIZE:
        epoch = result.get("epoch")
        return f"batch size {result.get('batch_size')}" + (f" from epoch {epoch}" if isinstance(epoch, int) else "")
    if op == "widen":
        return widen_text(changes, structure)
    if op == "remove_filters":
        return _resize_text(changes) + f"; removed {_indices(changes.get('removed'))}"
    if op == "insert_layer":
        return f"inserted {', '.join(map(str, changes.get('inserted') or []))} after {changes.get('anchor')}"
    if op == "remove_layer":
        return f"{args.get('layer') or changes.get('layer') or 'the layer'} replaced by an identity"
    if op in FREEZE_OPS:
        frozen = changes.get("frozen") or {}
        return "frozen now: " + (", ".join(f"{k}" if v == "all" else f"{k}[{_indices(v)}]"
                                           for k, v in frozen.items()) or "nothing")
    if op == "reinit_filters":
        return f"{changes.get('layer')}: re-initialised {_indices(changes.get('filters'))} ({changes.get('mode')})"
    return ""


def hparams_text(groups: Any) -> str:
    """``lr 0.1 → 0.01`` per field (once when every group changed alike, else per group)."""
    if not isinstance(groups, list) or not groups:
        return ""
    fields: dict[str, set] = {}
    for entry in groups:
        for name in HPARAM_NAMES:
            pair = entry.get(name) if isinstance(entry, dict) else None
            if isinstance(pair, list) and len(pair) == 2:
                fields.setdefault(name, set()).add((_number(pair[0]), _number(pair[1])))
    parts = []
    for name, pairs in fields.items():
        if len(pairs) == 1:
            old, new = next(iter(pairs))
            parts.append(f"{name} {old} → {new}")
        else:
            parts.append(f"{name} → {', '.join(sorted({new for _, new in pairs}))} ({len(pairs)} groups)")
    return "; ".join(parts)


def widen_text(changes: dict[str, Any], structure: dict[str, Any] | None) -> str:
    """``net.conv2: 20 → 21 filters; added index 20 (id 66)``: the new filters' ids from the structure once it
    has the new width."""
    text = _resize_text(changes)
    channels = changes.get("channels")
    if not (isinstance(channels, list) and len(channels) == 2 and all(isinstance(c, int) for c in channels)):
        return text
    old, new = channels
    indices = _added_at(changes.get("added_at"), old, new)
    layer = next((l for l in (structure or {}).get("layers", []) if l.get("name") == changes.get("layer")), None)
    ids = (layer or {}).get("filter_ids")
    added = f"added {'index' if len(indices) == 1 else 'indices'} {_indices(indices)}"
    if isinstance(ids, list) and len(ids) == new:
        added += f" (id{'s' if len(indices) > 1 else ''} {_indices([ids[i] for i in indices])})"
    group = [name for name in changes.get("group") or [] if name != changes.get("layer")]
    return f"{text}; {added}" + (f"; coupled: {', '.join(group)}" if group else "")


def _added_at(added_at: Any, old: int, new: int) -> list[int]:
    """Where a widen put its new filters: ``changes.added_at`` (a grouped conv's new filters sit at the end of each
    of its groups), or after the old ones (acks from before the field existed)."""
    if (isinstance(added_at, list) and len(added_at) == new - old
            and all(type(i) is int and 0 <= i < new for i in added_at)):
        return list(added_at)
    return list(range(old, new))


def _resize_text(changes: dict[str, Any]) -> str:
    channels = changes.get("channels")
    if isinstance(channels, list) and len(channels) == 2:
        return f"{changes.get('layer')}: {channels[0]} → {channels[1]} filters"
    return str(changes.get("layer") or "")


def _indices(values: Any, most: int = 12) -> str:
    values = list(values or [])
    shown = ", ".join(map(str, values[:most]))
    return shown + (f", … ({len(values)} in all)" if len(values) > most else "")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
