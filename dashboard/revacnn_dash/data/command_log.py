"""The dashboard's log of steering commands: one ``Event`` per command — sent from this page, seen acknowledged on
telemetry (another client's, the run's own), or read from a recording's steering log — and what became of it, with
the short label the charts' markers and the log show (``command_label``). ``RunState`` keeps a run's events."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from revacnn.wire.ops import FILTER_LIST_OPS, FREEZE_OPS, HPARAM_NAMES, SET_BATCH_SIZE, SET_HPARAMS


@dataclass
class Event:
    """One steering command and what became of it: pending → queued → done | error."""

    id: str
    op: str
    args: dict[str, Any]
    status: str = "pending"
    error: str | None = None
    step: int | None = None
    sent: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    result: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    generation: int = 0          # the trainer process it was sent to (RunState.generation)

    def label(self) -> str:
        """Short text for a chart marker, e.g. ``widen net.conv2 +1``. Acks seen on telemetry or in a recording
        carry no args: then the op and what its result names."""
        if isinstance((self.result or {}).get("divergence"), dict):   # the divergence guard's own command
            return f"divergence → {self.op}"
        if not self.args:
            changes = (self.result or {}).get("changes") or {}
            if self.op == SET_BATCH_SIZE and isinstance(self.result.get("batch_size"), int):
                return command_label(self.op, {"batch_size": self.result["batch_size"]})
            groups = changes.get("groups") if isinstance(changes, dict) else None
            if self.op == SET_HPARAMS and isinstance(groups, list) and groups and isinstance(groups[0], dict):
                changes = groups[0]       # the ack's per-group [old, new]: the first group's new values
            if self.op == SET_HPARAMS and isinstance(changes, dict):
                values = {k: v for k, v in changes.items() if k in HPARAM_NAMES}
                flat = {k: (v.get("new") if isinstance(v, dict) else v[-1] if isinstance(v, list) and v else v)
                        for k, v in values.items()}
                if flat and all(isinstance(v, (int, float)) for v in flat.values()):
                    return command_label(self.op, flat)
            layer = changes.get("layer") if isinstance(changes, dict) else None
            channels = changes.get("channels") if isinstance(changes, dict) else None
            if self.op == "widen" and layer and isinstance(channels, list) and len(channels) == 2:
                return command_label(self.op, {"layer": layer, "count": channels[1] - channels[0]})
            return f"{self.op} {layer}" if layer else self.op
        return command_label(self.op, self.args)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "args": self.args, "status": self.status, "error": self.error,
                "step": self.step, "sent": self.sent, "updated": self.updated, "label": self.label(),
                "note": self.note, "generation": self.generation, "result": self.result,
                "restore_point": (self.result or {}).get("restore_point")}


def command_label(op: str, args: dict[str, Any]) -> str:
    args = args or {}
    if op == SET_HPARAMS:
        return "set " + ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                  for k, v in args.items())
    if op == SET_BATCH_SIZE:
        return f"batch_size={args.get('batch_size')}"
    if op == "widen":
        return f"widen {args.get('layer')} +{args.get('count')}"
    if op in FREEZE_OPS:
        if "layers" in args:
            return f"{op} {', '.join(map(str, args['layers']))}"
        return f"{op} {args.get('layer')}[{', '.join(map(str, args.get('filters', [])))}]"
    if op in FILTER_LIST_OPS:
        return f"{op.split('_')[0]} {args.get('layer')}[{', '.join(map(str, args.get('filters', [])))}]"
    if op == "insert_layer":
        return f"insert after {args.get('after')}"
    if op == "remove_layer":
        return f"remove {args.get('layer')}"
    return op
