"""The bounded, thread-safe state of one run as the dashboard sees it.

An I/O thread (``revacnn_dash.data.worker``) applies protocol messages here; Dash callbacks read copies. Nothing grows
without bound: step scalars (``data.scalars``) and per-filter arrays live in ring buffers, the log of commands
(``data.command_log``) is capped, and only the latest snapshot is kept (plus its step list for the replay of
recorded runs).
"""

from __future__ import annotations

import collections
import math
import threading
import time
import uuid
from typing import Any

import numpy as np

from revacnn.wire.acks import DONE, ERROR, QUEUED, TERMINAL_STATES
from revacnn.wire.protocol import FILTER_FIELDS, Message

from .command_log import Event
from .scalars import HISTORY_KEYS, SCALAR_KEYS, Ring, metric_name

#: Connection states shown in the banner.
CONNECTING, LIVE, UNREACHABLE, FINISHED, INCOMPATIBLE, REPLAY = (
    "connecting", "live", "unreachable", "finished", "incompatible", "replay")
ROOT_BRANCH = {"branch": 0, "parent": None, "from_step": 0, "at_step": None, "restore_point": None, "reason": "start"}
DIVERGED_AFTER = 3   # steps in a row with a NaN or infinite loss that the banner calls a diverged run


def run_name(run_id: str, structure: dict[str, Any] | None) -> str:
    """A run as a reader tells it from the others: the name the user gave it (``ReVACNNCallback(name=...)``, in
    the structure), its module's class and start time, then its id (``baseline lr 0.1 · ClassifierModule · Dec 07
    14:03:12 · 20261207-140312-ab12cd``); the id alone before its structure arrives, and no time where the id does
    not start with one (a run directory named by hand)."""
    parts = [user_run_name(structure), str((structure or {}).get("model") or "")]
    try:
        parts.append(time.strftime("%b %d %H:%M:%S", time.strptime(run_id[:15], "%Y%m%d-%H%M%S")))
    except ValueError:
        pass
    return " · ".join([p for p in parts if p] + [run_id])


def user_run_name(structure: dict[str, Any] | None) -> str:
    """The name the user gave the run, "" when none (the structure's ``name``: a str, or nil)."""
    name = (structure or {}).get("name")
    return name if isinstance(name, str) else ""


FILTER_HISTORY_BYTES = 16 << 20    # the per-filter steps a run keeps, at most (the newest always)


class RunState:
    """Everything the views need about one run; every method takes the lock, readers get copies."""

    def __init__(self, target: str, label: str | None = None, scalar_capacity: int = 20000,
                 filter_capacity: int = 256, event_capacity: int = 500, source: str = "live") -> None:
        self.lock = threading.RLock()
        self.target = target
        self.label = label or target
        self.source = source
        self.key = uuid.uuid5(uuid.NAMESPACE_URL, f"{source}:{target}").hex[:10]
        self.conn = REPLAY if source == "replay" else CONNECTING
        self.conn_message = "" if source == "replay" else f"connecting to {target}…"
        self.generation = 0            # +1 whenever the history is reset (a new trainer process)
        self.run_id = ""
        self.structure: dict[str, Any] | None = None
        self.hparams: dict[str, Any] | None = None
        self.status: dict[str, Any] | None = None
        self.last_heard = 0.0
        self.scalar_capacity = scalar_capacity
        self.scalars = Ring(HISTORY_KEYS, scalar_capacity)
        self.last_scalar_step: int | None = None    # the newest step charted
        self.first_live_step: int | None = None     # the first step this process's wire charted (data.history)
        self.history_revision = 0      # +1 when older steps are merged in front of the ring (the chart is redrawn)
        self.recording_path: str | None = None      # the run's recording on this machine, once found
        self._loss_not_finite: tuple[int | None, int] = (None, 0)  # first step of the current streak, its length
        self.branches: list[dict[str, Any]] = [dict(ROOT_BRANCH)]   # undo and rewind made the run a tree
        self.val: collections.deque[dict[str, Any]] = collections.deque(maxlen=5000)
        self.filter_steps: collections.deque[tuple[int, int, np.ndarray, list[str]]] = collections.deque(
            maxlen=filter_capacity)   # (step, revision, [5, F] array, layer names)
        self.layer_ratio: dict[str, float] = {}
        self.snapshot: Message | None = None
        self.events: collections.OrderedDict[str, Event] = collections.OrderedDict()
        self.event_capacity = event_capacity
        self.outbox: collections.deque[str] = collections.deque(maxlen=100)
        self.log: collections.deque[tuple[float, str]] = collections.deque(maxlen=200)
        self.gaps = 0
        self.messages = 0

    # -- connection ------------------------------------------------------------------------------------------------
    def set_connection(self, conn: str, message: str) -> None:
        with self.lock:
            if (conn, message) != (self.conn, self.conn_message):
                self.log.append((time.time(), f"{conn}: {message}"))
            self.conn, self.conn_message = conn, message

    def connected(self, welcome: dict[str, Any]) -> None:
        """A (re)connection: a new run id means a new trainer process, so the history starts again."""
        with self.lock:
            run_id = str(welcome.get("run", ""))
            if self.run_id and run_id != self.run_id:
                self._reset_history()
                self.log.append((time.time(), f"trainer restarted: run {self.run_id} → {run_id}"))
            self.run_id = run_id
            self.last_heard = time.monotonic()
            self.set_connection(LIVE, f"connected to run {run_id}")

    def _reset_history(self) -> None:
        self.generation += 1
        self.structure = self.hparams = self.status = None
        self.scalars = Ring(HISTORY_KEYS, self.scalar_capacity)
        self.last_scalar_step = self.first_live_step = self.recording_path = None
        self._loss_not_finite = (None, 0)
        self.branches = [dict(ROOT_BRANCH)]
        self.val.clear()
        self.filter_steps.clear()
        self.layer_ratio = {}
        self.snapshot = None
        for event in self.events.values():
            if event.status in ("pending", "queued"):
                event.status, event.error = "error", "the trainer restarted before applying it"
                event.updated = time.time()

    # -- messages --------------------------------------------------------------------------------------------------
    def apply(self, message: Message) -> None:
        """One message into the state: a live one from the I/O thread, or a recorded one replayed
        (``data.replay``), which is not counted as heard."""
        with self.lock:
            if self.source != "replay":
                self.messages += 1
                self.last_heard = time.monotonic()
            handler = getattr(self, "_on_" + message.type, None)
            if handler is not None:
                handler(message)

    def _on_structure(self, m: Message) -> None:
        self.structure = m.body

    def _on_hparams(self, m: Message) -> None:
        self.hparams = m.body

    def _on_status(self, m: Message) -> None:
        self.status = m.body
        if self.source == "replay":   # a recording's last status: the replay sets the connection line itself
            return
        state = m.body.get("state")
        if state in TERMINAL_STATES:
            msg = m.body.get("message") or ""
            self.set_connection(FINISHED, f"run {state} at step {m.body.get('step')}" + (f": {msg}" if msg else ""))
        elif self.conn != LIVE:
            self.set_connection(LIVE, f"connected to run {self.run_id}")

    def _on_step(self, m: Message) -> None:
        b = m.body
        self._chart_step(b)
        if b.get("per_filter") and "filters" in m.arrays:
            names = list(b.get("layer_names") or [l["name"] for l in (self.structure or {}).get("layers", [])])
            self.filter_steps.append((int(b.get("step") or 0), int(b.get("revision") or 0),
                                      np.asarray(m.arrays["filters"], dtype=np.float32), names))
            # bounded in bytes too: a ResNet-50's 256 steps held 141 MB, and the views read the newest only
            while len(self.filter_steps) > 1 and \
                    sum(a.nbytes for _, _, a, _ in self.filter_steps) > FILTER_HISTORY_BYTES:
                self.filter_steps.popleft()
            if "layers" in m.arrays:
                self.layer_ratio = dict(zip(names, map(float, m.arrays["layers"])))

    def _on_steps(self, m: Message) -> None:
        for row in m.body.get("rows") or []:
            if isinstance(row, dict):
                self._chart_step(row)

    def _chart_step(self, b: dict[str, Any]) -> None:
        """One step's scalars (a ``step`` body or a row of ``steps``) onto the charts."""
        groups = b.get("groups") or [{}]
        group = groups[0] if isinstance(groups[0], dict) else {}
        metrics = b.get("metrics") or {}
        acc = metrics.get(metric_name(metrics, "acc", "train"))
        not_finite = b.get("not_finite") if isinstance(b.get("not_finite"), list) else ()
        loss, loss_name = b.get("loss"), "loss"
        if loss is None and "loss" not in not_finite:  # the step returned none (manual optimization): the loss it
            loss_name = metric_name(metrics, "loss", "train")  # logged, if any
            loss = metrics.get(loss_name)
        step = b.get("step")
        # A step already charted (a state snapshot re-sent on reconnecting to the same run) is not charted again.
        if not isinstance(step, int) or self.last_scalar_step is None or step > self.last_scalar_step:
            self.last_scalar_step = step if isinstance(step, int) else self.last_scalar_step
            if self.first_live_step is None and isinstance(step, int) and self.source != "replay":
                self.first_live_step = step
            self.append_scalars({"step": step, "loss": loss, "train_acc": acc,
                                 "lr": group.get("lr"), "momentum": group.get("momentum"),
                                 "weight_decay": group.get("weight_decay"), "batch_size": b.get("batch_size"),
                                 "samples_per_s": b.get("samples_per_s"), "branch": self.branches[-1]["branch"]},
                                loss_not_finite=loss_name in not_finite)

    def append_scalars(self, row: dict[str, Any], loss_not_finite: bool = False) -> None:
        """One step's row onto the charts, noting where the loss stopped being finite: a diverged run's chart just
        stops, so the banner says since when. The wire carries a NaN or infinite loss as nil and names it in the
        row's ``not_finite`` (``loss_not_finite``); a step that returned no loss neither starts nor ends a streak."""
        self.scalars.append({**row, "loss_not_finite": 1.0 if loss_not_finite else None})
        loss = row.get("loss")
        if loss_not_finite:
            first, length = self._loss_not_finite
            step = row.get("step")     # a recorded step comes as a float
            step = int(step) if isinstance(step, (int, float)) and math.isfinite(step) else None
            self._loss_not_finite = (step if length == 0 else first, length + 1)
        elif loss is not None and math.isfinite(loss):
            self._loss_not_finite = (None, 0)

    def merge_history(self, rows: dict[str, np.ndarray], val: list[dict[str, Any]],
                      commands: list[dict[str, Any]]) -> bool:
        """Steps (``HISTORY_KEYS`` columns), validations and final acks recorded before this process's wire reached
        the dashboard (``data.history``), merged with what the wire brought: one row per step, the wire's where both
        have one, in step order, so the chart has no gap or duplicate at the seam. The chart is redrawn
        (``history_revision``) when steps were added. Returns whether anything was."""
        with self.lock:
            added = self._merge_steps(rows)
            held_val = {v.get("step") for v in self.val}
            missing = [v for v in val if v.get("step") not in held_val]
            if missing:
                merged = sorted([*missing, *self.val], key=lambda v: (v.get("step") is None, v.get("step") or 0))
                self.val.clear()
                self.val.extend(merged[-(self.val.maxlen or len(merged)):])
            recorded = [c for c in commands if str(c.get("id")) not in self.events]
            if recorded:
                held_events = list(self.events.values())
                self.events.clear()
                for entry in recorded:
                    self.add_recorded_event(entry, note="before this page connected")
                for event in held_events:
                    self.events[event.id] = event
                while len(self.events) > self.event_capacity:
                    self.events.popitem(last=False)
            return added or bool(missing) or bool(recorded)

    def _merge_steps(self, rows: dict[str, np.ndarray]) -> bool:
        steps = np.asarray(rows.get("step", ()), dtype=float)
        held, _ = self.scalars.since(0)
        known = set(held["step"][np.isfinite(held["step"])].astype(np.int64).tolist())
        new = np.array([bool(np.isfinite(v)) and int(v) not in known for v in steps], dtype=bool)
        if not new.any():
            return False
        nan = np.full(len(steps), np.nan)
        merged = {k: np.concatenate([np.asarray(rows.get(k, nan), dtype=float)[new], held[k]]) for k in HISTORY_KEYS}
        order = np.argsort(merged["step"], kind="stable")[-self.scalar_capacity:]   # a step-less row (NaN) last
        self.scalars = Ring(HISTORY_KEYS, self.scalar_capacity)
        self._loss_not_finite = (None, 0)
        for i in order:
            self.append_scalars({k: (None if np.isnan(merged[k][i]) else float(merged[k][i])) for k in SCALAR_KEYS},
                                loss_not_finite=merged["loss_not_finite"][i] == 1.0)
        finite = merged["step"][np.isfinite(merged["step"])]
        self.last_scalar_step = max(int(finite.max()), self.last_scalar_step or 0)
        self.history_revision += 1
        return True

    @property
    def loss_not_finite_since(self) -> int | None:
        first, length = self._loss_not_finite
        return first if length >= DIVERGED_AFTER else None

    def _on_snapshot(self, m: Message) -> None:
        self.snapshot = m

    def _on_val(self, m: Message) -> None:
        metrics = m.body.get("metrics") or {}
        row = {"step": m.body.get("step"), "epoch": m.body.get("epoch"),
               "val_loss": metrics.get(metric_name(metrics, "loss", "val")),
               "val_acc": metrics.get(metric_name(metrics, "acc", "val"))}
        if self.val and self.val[-1].get("step") == row["step"]:
            self.val[-1] = row     # the state snapshot re-sends the latest validation (or the recording had it)
        else:
            self.val.append(row)

    def _on_ack(self, m: Message) -> None:
        b = m.body
        event = self.events.get(str(b.get("id")))
        if event is None:   # another client's command, seen on telemetry
            if b.get("status") == QUEUED:
                return
            event = self._add_event(str(b.get("id")), str(b.get("op")), {}, note="from another client")
        order = {"pending": 0, QUEUED: 1, DONE: 2, ERROR: 2}
        status = str(b.get("status"))
        if order.get(status, 0) < order.get(event.status, 0):
            return   # a late 'queued' after the final ack
        event.status = status
        event.error = b.get("error")
        event.step = b.get("step")
        event.result = b.get("result") or {}
        event.updated = time.time()
        branch = event.result.get("branch") if status == DONE else None
        if isinstance(branch, dict) and isinstance(branch.get("from_step"), int):
            self._new_branch(branch)

    def _new_branch(self, branch: dict[str, Any]) -> None:
        """An undo or rewind: the run goes on from ``from_step`` as a new branch (its steps are charted again)."""
        if any(b["branch"] == branch.get("branch") for b in self.branches):
            return   # an ack seen twice (control socket and telemetry)
        self.branches.append({key: branch.get(key) for key in ROOT_BRANCH})
        self.last_scalar_step = branch["from_step"]
        self._loss_not_finite = (None, 0)

    # -- commands --------------------------------------------------------------------------------------------------
    def add_recorded_event(self, entry: dict[str, Any], note: str) -> None:
        """A command of the recording's steering log, with the final ack it got, as an event of the log."""
        event = self._add_event(str(entry.get("id")), str(entry.get("op")), entry.get("args") or {}, note=note)
        event.status, event.error, event.step = entry.get("status"), entry.get("error"), entry.get("step")
        event.sent = event.updated = float(entry.get("time") or event.sent)
        event.result = entry.get("result") or {}

    def _add_event(self, command_id: str, op: str, args: dict[str, Any], note: str = "") -> Event:
        event = Event(command_id, op, dict(args or {}), note=note, generation=self.generation)
        self.events[command_id] = event
        while len(self.events) > self.event_capacity:
            self.events.popitem(last=False)
        return event

    def submit(self, op: str, args: dict[str, Any] | None = None) -> str:
        """Queue a command for the I/O thread to send; returns its id (the event log shows it as pending)."""
        with self.lock:
            command_id = uuid.uuid4().hex
            event = self._add_event(command_id, op, args or {})
            if self.source == "replay":
                event.status, event.error = "error", "a recorded run cannot be steered"
            elif self.conn not in (LIVE,):
                event.status = "error"
                event.error = f"not sent: the run is {self.conn} ({self.conn_message})"
            else:
                self.outbox.append(command_id)
            return command_id

    def take_outbox(self) -> list[Event]:
        with self.lock:
            out = [self.events[i] for i in self.outbox if i in self.events]
            self.outbox.clear()
            return out

    def mark_unsent(self, command_id: str, error: str) -> None:
        with self.lock:
            event = self.events.get(command_id)
            if event is not None and event.status == "pending":
                event.status, event.error, event.updated = "error", error, time.time()

    # -- reading (copies, under the lock) ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        with self.lock:
            status = dict(self.status or {})
            last = self.scalars.since(max(0, self.scalars.total - 1))[0] if self.scalars.total else {}
            return {"key": self.key, "label": self.label, "target": self.target, "source": self.source,
                    "conn": self.conn, "conn_message": self.conn_message, "run_id": self.run_id,
                    "name": user_run_name(self.structure),
                    "generation": self.generation, "state": status.get("state"),
                    "step": _max_step(status.get("step"), last.get("step")),
                    "epoch": status.get("epoch"), "hparams": dict(self.hparams or {}),
                    "last": {k: float(v[0]) for k, v in last.items() if len(v)}, "gaps": self.gaps,
                    "messages": self.messages, "drops": status.get("drops"),
                    "security": status.get("security"), "resumed": status.get("resumed"),
                    "loss_not_finite_since": self.loss_not_finite_since,
                    "recording_error": status.get("recording_error"),
                    "telemetry_error": status.get("telemetry_error"), "schedule": status.get("schedule"),
                    "divergence": status.get("divergence"), "branches": [dict(b) for b in self.branches]}

    def scalars_since(self, cursor: int) -> tuple[dict[str, np.ndarray], int, int]:
        with self.lock:
            cols, start = self.scalars.since(cursor)
            return cols, start, self.scalars.total

    def val_history(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.val)

    def event_list(self, current_process: bool = False) -> list[dict[str, Any]]:
        """The commands, oldest first; with ``current_process``, only those sent to (or seen from) the trainer
        process connected now: a restarted trainer starts a fresh log."""
        with self.lock:
            return [e.as_dict() for e in self.events.values()
                    if not current_process or e.generation == self.generation]

    def latest_filters(self) -> tuple[int, np.ndarray, list[str]] | None:
        with self.lock:
            if not self.filter_steps:
                return None
            step, _, arr, names = self.filter_steps[-1]
            return step, arr, names

    def filters_by_layer(self) -> dict[str, dict[str, np.ndarray]]:
        """Latest per-filter fields split per layer: ``{layer: {field: array[out]}}``, sizes checked against the
        structure (a message from before a structural change may not match it)."""
        with self.lock:
            latest = self.latest_filters()
            structure = self.structure
        if latest is None or structure is None:
            return {}
        _, arr, names = latest
        outs = {l["name"]: int(l["out"]) for l in structure.get("layers", [])}
        result, col = {}, 0
        sizes = [outs.get(name) for name in names]
        if any(s is None for s in sizes) or sum(sizes) != arr.shape[1]:
            # The per-filter message predates the last structural change: split by the old widths if we can.
            return {}
        for name, size in zip(names, sizes):
            result[name] = {f: arr[i, col:col + size].copy() for i, f in enumerate(FILTER_FIELDS)}
            col += size
        return result


def _max_step(a: Any, b: Any) -> int | None:
    """The newest step known: the heartbeat's may lag the step messages."""
    values = [int(v[0]) if isinstance(v, np.ndarray) and len(v) and np.isfinite(v[0]) else v
              for v in (a, b)]
    values = [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(values) if values else None
