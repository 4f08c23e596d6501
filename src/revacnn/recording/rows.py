"""Rows of the events, scalars, layers and val streams: from a message's body, and as Arrow record batches. No torch.

Column layout of each stream: format.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

_INT_SCALARS = ("step", "epoch", "batch", "revision", "batch_size", "seq", "drops_telemetry", "drops_recording")
_GROUP_KEYS = ("lr", "momentum", "weight_decay")


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, float) and not math.isfinite(value) else int(value)
    except (TypeError, ValueError):
        return None


def scalar_row(body: dict[str, Any], sent: float, seq: int, drops: Any) -> dict[str, Any]:
    """One row of the scalars stream from a ``step`` body or a row of a ``steps`` message; ``time`` is when the step
    ended (the body's), or when the message was sent (``sent``) for a body without one."""
    stamp = body.get("time")
    row: dict[str, Any] = {"step": body.get("step"), "time": stamp if isinstance(stamp, (int, float)) else sent,
                           "seq": seq}
    for key in ("epoch", "batch", "revision", "loss", "samples_per_s", "batch_size"):
        row[key] = body.get(key)
    row["per_filter"] = bool(body.get("per_filter"))
    drops = drops if isinstance(drops, dict) else {}
    row["drops_telemetry"] = drops.get("telemetry")
    row["drops_recording"] = drops.get("recording")
    for g, group in enumerate(body.get("groups") or []):
        for key in _GROUP_KEYS:
            row[f"{key}/{g}"] = group.get(key) if isinstance(group, dict) else None
    for name, value in (body.get("metrics") or {}).items():
        row[name if name not in row else f"metrics/{name}"] = value
    for name in body.get("not_finite") or []:  # its value is nil on the wire (NaN or ±inf): 1.0 says which
        row[f"not_finite/{name}"] = 1.0
    return row


def layers_batches(rows: list[tuple]) -> list[pa.RecordBatch]:
    """``(step, time, layer names, [L] values)`` rows as record batches, one per run of rows with the same layers."""
    batches = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][2] != rows[start][2]:
            chunk = rows[start:i]
            names = chunk[0][2]
            values = np.stack([r[3] for r in chunk])
            arrays = [pa.array([r[0] for r in chunk], pa.int64()), pa.array([r[1] for r in chunk])]
            arrays += [pa.array(values[:, j]) for j in range(len(names))]
            batches.append(pa.RecordBatch.from_arrays(arrays, names=["step", "time", *names]))
            start = i
    return batches


def scalars_batch(rows: list[dict[str, Any]], columns: dict[str, None]) -> pa.RecordBatch:
    """Scalar rows as one record batch; ``columns`` (an ordered set, updated here) keeps every column seen so far
    in order of appearance, so the schema only grows."""
    for row in rows:
        columns.update(dict.fromkeys(row))
    arrays = []
    for key in columns:
        values = [row.get(key) for row in rows]
        if key in _INT_SCALARS:
            kind = pa.int64()
            values = [_int_or_none(v) for v in values]
        elif key == "per_filter":
            kind = pa.bool_()
            values = [None if v is None else bool(v) for v in values]
        else:
            kind = pa.float64()
            values = [_float_or_none(v) for v in values]
        arrays.append(pa.array(values, kind))
    return pa.RecordBatch.from_arrays(arrays, names=list(columns))


def val_batch(rows: list[tuple]) -> pa.RecordBatch:
    """``(step, epoch, time, seq, body JSON, pred, label)`` rows as one record batch."""
    arrays = [pa.array([r[0] for r in rows], pa.int64()), pa.array([r[1] for r in rows], pa.int64()),
              pa.array([r[2] for r in rows], pa.float64()), pa.array([r[3] for r in rows], pa.int64()),
              pa.array([r[4] for r in rows], pa.string()),
              pa.array([None if r[5] is None else np.asarray(r[5], np.int16) for r in rows], pa.list_(pa.int16())),
              pa.array([None if r[6] is None else np.asarray(r[6], np.int16) for r in rows], pa.list_(pa.int16()))]
    return pa.RecordBatch.from_arrays(arrays, names=["step", "epoch", "time", "seq", "body", "pred", "label"])


def events_batch(rows: list[tuple]) -> pa.RecordBatch:
    """``(seq, time, type, step, body JSON)`` rows as one record batch."""
    arrays = [pa.array([r[0] for r in rows], pa.int64()), pa.array([r[1] for r in rows], pa.float64()),
              pa.array([r[2] for r in rows], pa.string()), pa.array([r[3] for r in rows], pa.int64()),
              pa.array([r[4] for r in rows], pa.string())]
    return pa.RecordBatch.from_arrays(arrays, names=["seq", "time", "type", "step", "body"])
