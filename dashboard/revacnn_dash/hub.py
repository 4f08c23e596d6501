"""The runs the dashboard shows: live ones (each with its I/O thread) and recorded ones from a log directory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from revacnn.wire.protocol import Message

from .compute.embedding_service import EmbeddingService
from .state import FILTER_FIELDS, REPLAY, RunState, metric_name
from .worker import RunWorker


class Hub:
    def __init__(self, targets: list[str] = (), logdir: str | None = None, warm_umap: bool = True,
                 silence_s: float = 5.0, client_options: dict[str, Any] | None = None) -> None:
        # RunClient's CURVE options for every live run: client_keys, server_key, host (docs/remote.md).
        self.client_options = {k: v for k, v in (client_options or {}).items() if v is not None}
        if self.client_options.get("client_keys") is not None:
            from revacnn.wire.connection import load_keypair

            load_keypair(self.client_options["client_keys"])   # a bad key file fails at start, not per run
        self.runs: dict[str, RunState] = {}
        self.workers: dict[str, RunWorker] = {}
        self.replays: dict[str, Any] = {}         # key → RunReader
        self.logdir = logdir
        self.scan_every_s = 5.0
        self._scanned: tuple[str | None, float] = (None, 0.0)
        self.lock = threading.Lock()
        self.embeddings = EmbeddingService()
        if warm_umap:
            self.embeddings.warm_umap()
        for target in targets:
            self.add_live(target, silence_s=silence_s)

    def add_live(self, target: str, silence_s: float = 5.0) -> RunState:
        state = RunState(str(target))
        worker = RunWorker(state, silence_s=silence_s, client_options=self.client_options)
        with self.lock:
            self.runs[state.key] = state
            self.workers[state.key] = worker
        worker.start()
        return state

    def recording_dirs(self) -> list[Path]:
        """Where recordings are: ``--logdir`` and the local directories of the live runs (their run directories)."""
        dirs = [Path(self.logdir)] if self.logdir else []
        with self.lock:
            targets = [state.target for state in self.runs.values()]
        for target in targets:
            path = Path(target)
            if not str(target).startswith("tcp://") and path.exists():
                dirs.append(path.parent if path.is_file() else path)
        return dirs

    def get(self, key: str | None) -> RunState | None:
        with self.lock:
            if key in self.runs:
                return self.runs[key]
            return next(iter(self.runs.values()), None) if key is None else None

    def options(self) -> list[dict[str, str]]:
        self.scan_logdir()
        with self.lock:
            states = list(self.runs.values())
        out = []
        for s in states:
            prefix = "● live" if s.source == "live" else "◼ recorded"
            name = s.run_id or s.label
            out.append({"label": f"{prefix}: {name} ({s.conn})" if s.source == "live" else f"{prefix}: {name}",
                        "value": s.key})
        return out

    def scan_logdir(self) -> None:
        """Add recorded runs found below ``logdir`` (at most every ``scan_every_s``; the header polls each tick)."""
        if not self.logdir:
            return
        now = time.monotonic()
        if self._scanned[0] == self.logdir and now - self._scanned[1] < self.scan_every_s:
            return
        self._scanned = (self.logdir, now)
        try:
            from revacnn.recording.reader import list_runs, open_run
        except ImportError:      # the reader needs pyarrow; without it there is no replay
            return
        for info in list_runs(self.logdir):
            path = info["path"]
            state = RunState(path, label=info.get("run_id") or Path(path).name, source="replay")
            with self.lock:
                if state.key in self.runs:
                    continue
                self.runs[state.key] = state
            try:
                reader = open_run(path)
                self.replays[state.key] = reader
                load_replay(state, reader)
            except Exception as error:   # a damaged recording must not take the page down
                state.set_connection(REPLAY, f"cannot read {path}: {type(error).__name__}: {error}")

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stopping.set()
        for worker in self.workers.values():
            worker.join(3)
        self.embeddings.shutdown()


def load_replay(state: RunState, reader, step: int | None = None) -> None:
    """Fill ``state`` from a recording, as of ``step`` (default: the last snapshot)."""
    reader.refresh()
    steps = reader.snapshot_steps()
    if step is None and steps:
        step = steps[-1]
    with state.lock:
        state._reset_history()
        state.run_id = reader.info.get("run_id") or state.label
        structures = reader.structures()
        chosen = None
        for s_step, body in structures:
            if chosen is None or s_step is None or step is None or s_step <= step:
                chosen = body
        state.structure = chosen
        hps = reader.hparams()
        state.hparams = hps[-1][1] if hps else None
        state.status = reader.status()
        recorded = reader.summary()
        if state.status is not None and not recorded["finished"]:  # its last state, not necessarily the trainer's now
            written = time.strftime("%H:%M:%S", time.localtime(recorded["last_write"]))
            state.status["state"] = f"{state.status.get('state')} at its last write, {written} (recording not closed)"
        scal = reader.scalars()
        if scal and "step" in scal:
            nan = np.full(len(scal["step"]), np.nan)
            logged = [name for name in scal if not name.startswith("not_finite/")]  # which values were NaN or ±inf
            acc = scal.get(metric_name(logged, "acc", "train"), nan)
            loss, loss_name = scal.get("loss", nan), "loss"
            if not np.isfinite(np.asarray(loss, dtype=float)).any() and "not_finite/loss" not in scal:
                loss_name = metric_name([name for name in logged if name != "loss"], "loss", "train")
                loss = scal.get(loss_name, nan)  # the steps returned none: the loss they logged
            not_finite = scal.get(f"not_finite/{loss_name}", nan) == 1.0
            for i in range(len(scal["step"])):
                state.append_scalars({"step": scal["step"][i], "loss": loss[i],
                                      "train_acc": acc[i], "lr": _col(scal, "lr/0", i),
                                      "momentum": _col(scal, "momentum/0", i),
                                      "weight_decay": _col(scal, "weight_decay/0", i),
                                      "batch_size": _col(scal, "batch_size", i),
                                      "samples_per_s": _col(scal, "samples_per_s", i)},
                                     loss_not_finite=bool(not_finite[i]))
        val = reader.val_predictions()  # the latest timeline: a resumed run's validations replace the abandoned ones
        columns = {kind: val["metrics"].get(metric_name(val["metrics"], kind, "val")) for kind in ("loss", "acc")}
        for i, row_step in enumerate(val["steps"].tolist()):
            values = {kind: None if column is None or not np.isfinite(column[i]) else float(column[i])
                      for kind, column in columns.items()}
            state.val.append({"step": row_step, "val_loss": values["loss"], "val_acc": values["acc"]})
        for entry in reader.steering_log():
            event = state._add_event(str(entry.get("id")), str(entry.get("op")), entry.get("args") or {},
                                     note="recorded")
            event.status, event.error, event.step = entry.get("status"), entry.get("error"), entry.get("step")
            event.sent = event.updated = float(entry.get("time") or event.sent)
            event.result = entry.get("result") or {}
        if step is not None:
            snap = reader.snapshot(step)
            state.snapshot = Message("snapshot", snap.get("body", {}), snap.get("arrays", {}),
                                     seq=int(snap.get("seq") or 0))
            state.snapshot_count += 1
        if chosen is not None and step is not None:
            names = [l["name"] for l in chosen.get("layers", [])]
            rows = []
            for f in FILTER_FIELDS:
                parts = []
                for layer in chosen.get("layers", []):
                    series = reader.filter_series(layer["name"], f, stop=step + 1)
                    values = series.get("values") if series else None
                    row = np.full(int(layer["out"]), np.nan, dtype=np.float32)
                    if values is not None and len(values):
                        last = np.asarray(values[-1], dtype=np.float32)[: len(row)]
                        row[: len(last)] = last
                    parts.append(row)
                rows.append(np.concatenate(parts) if parts else np.zeros(0, np.float32))
            state.filter_steps.append((int(step), 0, np.stack(rows), names))
        state.replay_step = step
        state.replay_steps = steps
        shown = f"{len(steps)} snapshots; showing step {step}" if steps else "no snapshots"
        state.set_connection(REPLAY, f"recorded run {state.run_id}: {len(state.scalars)} steps, {shown}")
        state.change_counter += 1


def _col(cols: dict[str, np.ndarray], key: str, i: int):
    arr = cols.get(key)
    return None if arr is None else arr[i]
