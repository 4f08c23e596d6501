"""A recorded run shown as a run: the recording's messages (structure, hyper-parameters, status, snapshot) go
through ``RunState.apply`` like a live run's; its columns (scalars, validations, per-filter values) and its steering
log fill the same fields the live messages fill."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from revacnn.wire.protocol import FILTER_FIELDS, Message

from .scalars import HISTORY_KEYS, SCALAR_KEYS, metric_name
from .state import REPLAY, RunState


def load_replay(state: RunState, reader, step: int | None = None) -> None:
    """Fill ``state`` from a recording, as of ``step`` (default: the last snapshot)."""
    reader.refresh()
    steps = reader.snapshot_steps()
    if step is None and steps:
        step = steps[-1]
    with state.lock:
        state._reset_history()
        state.run_id = reader.info.get("run_id") or state.label
        structure = _structure_at(reader.structures(), step)
        for message in _recorded_messages(reader, structure, step):
            state.apply(message)
        _replay_scalars(state, reader.scalars())
        _replay_validations(state, reader.val_predictions())
        _replay_steering_log(state, reader.steering_log())
        if structure is not None and step is not None:
            state.filter_steps.append((int(step), 0, _filters_at(reader, structure, step),
                                       [layer["name"] for layer in structure.get("layers", [])]))
        state.replay_step = step
        state.replay_steps = steps
        shown = f"{len(steps)} snapshots; showing step {step}" if steps else "no snapshots"
        state.set_connection(REPLAY, f"recorded run {state.run_id}: {len(state.scalars)} steps, {shown}")


def _structure_at(structures: list, step: int | None) -> dict[str, Any] | None:
    """The structure in force at ``step``: the last one recorded at or before it."""
    chosen = None
    for s_step, body in structures:
        if chosen is None or s_step is None or step is None or s_step <= step:
            chosen = body
    return chosen


def _recorded_messages(reader, structure: dict[str, Any] | None, step: int | None) -> list[Message]:
    """The recording's structure, last hyper-parameters, last status and the snapshot at ``step``, as messages."""
    messages = []
    if structure is not None:
        messages.append(Message("structure", structure))
    hps = reader.hparams()
    if hps and hps[-1][1] is not None:
        messages.append(Message("hparams", hps[-1][1]))
    status = reader.status()
    if status is not None:
        recorded = reader.summary()
        if not recorded["finished"]:  # its last state, not necessarily the trainer's now
            written = time.strftime("%H:%M:%S", time.localtime(recorded["last_write"]))
            status["state"] = f"{status.get('state')} at its last write, {written} (recording not closed)"
        messages.append(Message("status", status))
    if step is not None:
        snap = reader.snapshot(step)
        messages.append(Message("snapshot", snap.get("body", {}), snap.get("arrays", {}),
                                seq=int(snap.get("seq") or 0)))
    return messages


def _replay_scalars(state: RunState, scal: dict[str, np.ndarray]) -> None:
    """The recorded step scalars onto the charts (``RunState.append_scalars``, where a live step ends too)."""
    cols = recorded_columns(scal)
    for i in range(len(cols["step"])):
        state.append_scalars({k: cols[k][i] for k in SCALAR_KEYS}, loss_not_finite=cols["loss_not_finite"][i] == 1.0)


def recorded_columns(scal: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A recording's scalars (``RunReader.scalars``) as the chart's columns (``HISTORY_KEYS``): the loss (or, for
    steps that returned none, the loss they logged), the train accuracy, the first group's hyper-parameters, and
    1.0 where the loss was NaN or ±inf."""
    steps = np.asarray(scal.get("step", ()), dtype=float)
    nan = np.full(len(steps), np.nan)
    if not len(steps):
        return {k: nan for k in HISTORY_KEYS}
    logged = [name for name in scal if not name.startswith("not_finite/")]  # which values were NaN or ±inf
    loss, loss_name = scal.get("loss", nan), "loss"
    if not np.isfinite(np.asarray(loss, dtype=float)).any() and "not_finite/loss" not in scal:
        loss_name = metric_name([name for name in logged if name != "loss"], "loss", "train")
        loss = scal.get(loss_name, nan)  # the steps returned none: the loss they logged
    columns = {"step": steps, "loss": loss, "train_acc": scal.get(metric_name(logged, "acc", "train"), nan),
               "lr": scal.get("lr/0", nan), "momentum": scal.get("momentum/0", nan),
               "weight_decay": scal.get("weight_decay/0", nan), "batch_size": scal.get("batch_size", nan),
               "samples_per_s": scal.get("samples_per_s", nan),
               "branch": nan,   # not in the recording's rows: a recorded step counts as on the current path
               "loss_not_finite": np.where(scal.get(f"not_finite/{loss_name}", nan) == 1.0, 1.0, np.nan)}
    return {k: np.asarray(v, dtype=float) for k, v in columns.items()}


def _replay_validations(state: RunState, val: dict[str, Any]) -> None:
    state.val.extend(recorded_validations(val))


def recorded_validations(val: dict[str, Any]) -> list[dict[str, Any]]:
    """The latest timeline's validations (``RunReader.val_predictions``; a resumed run's replace the abandoned
    ones) as the chart's rows."""
    columns = {kind: val["metrics"].get(metric_name(val["metrics"], kind, "val")) for kind in ("loss", "acc")}
    rows = []
    for i, row_step in enumerate(val["steps"].tolist()):
        values = {kind: None if column is None or not np.isfinite(column[i]) else float(column[i])
                  for kind, column in columns.items()}
        rows.append({"step": row_step, "val_loss": values["loss"], "val_acc": values["acc"]})
    return rows


def _replay_steering_log(state: RunState, entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        state.add_recorded_event(entry, note="recorded")


def _filters_at(reader, structure: dict[str, Any], step: int) -> np.ndarray:
    """The per-filter fields at ``step``, as a [fields, filters] array in the layers' order (NaN where missing)."""
    rows = []
    for f in FILTER_FIELDS:
        parts = []
        for layer in structure.get("layers", []):
            series = reader.filter_series(layer["name"], f, stop=step + 1)
            values = series.get("values") if series else None
            row = np.full(int(layer["out"]), np.nan, dtype=np.float32)
            if values is not None and len(values):
                last = np.asarray(values[-1], dtype=np.float32)[: len(row)]
                row[: len(last)] = last
            parts.append(row)
        rows.append(np.concatenate(parts) if parts else np.zeros(0, np.float32))
    return np.stack(rows)


def _col(cols: dict[str, np.ndarray], key: str, i: int):
    arr = cols.get(key)
    return None if arr is None else arr[i]
