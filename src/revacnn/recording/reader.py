"""Torch-free reader of run recordings: ``list_runs`` finds them, ``open_run`` reads one (also while it is written).

Every call re-scans the run directory: segments that did not change since the last call come from a cache (keyed by
size and mtime), the segment being appended is re-read, and a truncated last batch (a writer mid-append or killed)
is ignored. Layout and policies: docs/design.md, "Recording".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .branches import branch_tree, own_rows, rows_on_path
from .filter_series import PyramidSegments, read_filter_series
from ..wire.acks import TERMINAL_STATES
from .format import FORMAT_NAME, MARKER, list_segments, read_segment
from .lineage import latest_name, names_before, renamed_by
from .segment_cache import SegmentCache
from .snapshots import read_snapshot, snapshot_files
from .timeline import in_step_range, latest_timeline

__all__ = ["list_runs", "open_run", "RunReader"]

LIVE_SECONDS = 30.0


def _column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if column.null_count == 0:
        return column.to_numpy()
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)     # nulls → NaN
    return np.asarray(column.to_pylist(), dtype=object)



class RunReader:
    """Reads one run directory (see module docstring). Every accessor sees what has been appended so far."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        if not (self.path / MARKER).is_file():
            raise FileNotFoundError(f"{self.path} is not a revacnn run directory (no {MARKER})")
        self._streams = {name: SegmentCache(self.path / name) for name in ("events", "scalars", "layers", "val")}
        self._filters = PyramidSegments(self.path)
        self._renames: tuple[tuple, dict[str, str]] | None = None
        self.info: dict[str, Any] = {}
        self.refresh()

    def refresh(self) -> "RunReader":
        """Re-read run.json (accessors re-scan the data files on every call anyway)."""
        try:
            with open(self.path / MARKER) as handle:
                self.info = json.load(handle)
        except (OSError, ValueError):
            pass
        return self

    def __repr__(self) -> str:
        return f"RunReader({str(self.path)!r})"

    # -- raw tables (pandas / duckdb) ---------------------------------------------------------------------------
    def table(self, name: str) -> pa.Table | None:
        """The whole ``events``, ``scalars``, ``layers`` or ``val`` stream as one pyarrow Table (None if empty)."""
        return self._streams[name].table()

    def filter_table(self, layer: str, level: int = 0) -> pa.Table | None:
        """One layer's per-filter rows at one pyramid level as a pyarrow Table (list columns; ``filter_ids`` of each
        segment in its schema metadata, also added here as a list column)."""
        tables = []
        for segment in self._filters.segments(self.lineage(layer), level):
            ids = pa.array([segment.ids.tolist()] * segment.table.num_rows, pa.list_(pa.int64()))
            tables.append(segment.table.append_column("filter_ids", ids).replace_schema_metadata(None))
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="permissive")

    # -- events ---------------------------------------------------------------------------------------------------
    def _events(self, kind: str) -> list[dict]:
        table = self.table("events")
        if table is None:
            return []
        types = table.column("type").to_pylist()
        wanted = [i for i, t in enumerate(types) if t == kind]
        if not wanted:
            return []
        rows = table.take(pa.array(wanted, pa.int64())).to_pylist()
        for row in rows:
            row["body"] = json.loads(row["body"])
        return rows

    def structures(self) -> list[tuple[int | None, dict]]:
        """Structure history: ``[(step, structure body), …]`` in order. A structure is in force for the steps after
        its ``step``: the last step recorded before it (its body carries no step; the trainer publishes the steps
        measured before a change ahead of the change's structure, so the sequence numbers order them)."""
        rows = self._events("structure")
        if not rows:
            return []
        scalars = self.table("scalars")
        seqs = steps = np.zeros(0, np.int64)
        if scalars is not None:
            seqs = _column_numpy(scalars.column("seq")).astype(np.float64)
            steps = _column_numpy(scalars.column("step")).astype(np.float64)
        out = []
        for row in rows:
            step = row["step"]
            if step is None:
                before = steps[seqs < row["seq"]]
                before = before[np.isfinite(before)]
                step = int(before.max()) if len(before) else 0
            out.append((step, row["body"]))
        return out

    def hparams(self) -> list[tuple[int | None, dict]]:
        return [(row["step"], row["body"]) for row in self._events("hparams")]

    def layer_names(self) -> list[str]:
        """Every monitored layer of every structure under its latest name (a layer a command renamed is listed once;
        its series are read across the rename), in forward order: a layer inserted later comes after the layer it
        followed, a removed one stays where it was."""
        later = {old: new for new, old in self.renames().items()}
        names: list[str] = []
        for _, body in self.structures():
            previous = None
            for layer in body.get("layers", []):
                name = latest_name(layer["name"], later)
                if name not in names:   # a layer new in this structure goes after the one before it there
                    names.insert(names.index(previous) + 1 if previous in names else len(names), name)
                previous = name
        return names

    def renames(self) -> dict[str, str]:
        """New name → previous name of every layer a done command renamed (``insert_layer`` moves ``conv2`` into a
        Sequential as ``conv2.0``; the layer keeps its filters and their ids)."""
        events = self._streams["events"]
        version = tuple((path, events.cache[path][0]) for path, _ in events.read())    # (inode, size, mtime)
        if self._renames is not None and self._renames[0] == version:   # asked per layer: parse the acks once
            return dict(self._renames[1])
        out = {}
        for entry in self.steering_log():
            out.update({new: old for old, new in renamed_by(entry).items()})
        self._renames = (version, out)
        return dict(out)

    def lineage(self, layer: str) -> list[str]:
        """The names ``layer`` had, oldest first, ending with ``layer`` itself."""
        return names_before(layer, self.renames())

    def steering_log(self) -> list[dict]:
        """Final acks of every command, in order: seq, time, step, id, op, status, error, result, req."""
        out = []
        for row in self._events("ack"):
            body = row["body"]
            out.append({"seq": row["seq"], "time": row["time"], "step": body.get("step"), "id": body.get("id"),
                        "op": body.get("op"), "status": body.get("status"), "error": body.get("error"),
                        "result": body.get("result"), "req": body.get("req")})
        return out

    def status(self) -> dict | None:
        """The last recorded status body (plus its ``time``), or None. Heartbeats are recorded at most every few
        seconds, state changes always."""
        rows = self._events("status")
        if not rows:
            return None
        body = dict(rows[-1]["body"])
        body["time"] = rows[-1]["time"]
        return body

    def branches(self) -> list[dict[str, Any]]:
        """The run's branch tree (``recording.branches``): ``{branch, parent, from_step, at_step, restore_point,
        reason, seq}`` per branch, the root first; the last one is the branch of the current state."""
        return branch_tree(self.steering_log())

    # -- scalars ----------------------------------------------------------------------------------------------
    def scalars(self, start: int | None = None, stop: int | None = None, every: int = 1,
                branch: int | None = None, own: bool = False) -> dict[str, np.ndarray]:
        """Step scalars as numpy columns (``start <= step < stop``, every ``every``-th row): step, time, seq, epoch,
        batch, loss, samples_per_s, batch_size, per_filter, drops_*, ``lr/<group>``, ``momentum/<group>``,
        ``weight_decay/<group>``, one column per logged metric, and ``not_finite/<name>`` (1.0 where the loss or that
        metric was NaN or ±inf, which the wire sends as nil; NaN elsewhere). Missing values are NaN.

        By default the series that leads to the current state (steps an undo or rewind abandoned are left out).
        ``branch``: the series leading to that branch's end instead (``branches()``), or with ``own`` only the
        steps that branch trained itself."""
        table = self.table("scalars")
        if table is None:
            return {"step": np.zeros(0, np.int64)}
        steps = table.column("step").to_numpy(zero_copy_only=False)
        chosen = latest_timeline(steps)
        if branch is not None:
            seqs = table.column("seq").to_numpy(zero_copy_only=False)
            tree = self.branches()
            on_branch = own_rows(seqs, tree, branch) if own else rows_on_path(steps, seqs, tree, branch)
            # a fit resumed from a checkpoint into this recording still replaces what it re-did
            chosen = np.zeros(len(steps), bool)
            picked = np.nonzero(on_branch)[0]
            chosen[picked[latest_timeline(steps[picked])]] = True
        index = np.nonzero(chosen & in_step_range(steps, start, stop))[0][::max(1, int(every))]
        table = table.take(pa.array(index, pa.int64()))
        return {name: _column_numpy(table.column(name)) for name in table.column_names}

    def scalars_frame(self, start: int | None = None, stop: int | None = None, every: int = 1):
        import pandas as pd

        return pd.DataFrame(self.scalars(start, stop, every))

    def layer_series(self, field: str = "grad_weight_ratio", start: int | None = None,
                     stop: int | None = None) -> dict[str, Any]:
        """Per-layer ‖g‖₂/‖w‖₂ (the step message's ``layers`` buffer) of every per-filter step: ``{"step": [T],
        "layers": [L names], "values": [T, L] float32}`` (NaN where a layer did not exist), layers as in
        ``layer_names``, a renamed layer's column continuing those of its earlier names."""
        if field not in ("grad_weight_ratio", "layers"):
            raise KeyError(f"unknown per-layer field {field!r} (recorded: 'grad_weight_ratio')")
        table = self.table("layers")
        if table is None:
            return {"step": np.zeros(0, np.int64), "layers": [], "values": np.zeros((0, 0), np.float32)}
        steps = table.column("step").to_numpy()
        mask = latest_timeline(steps) & in_step_range(steps, start, stop)
        recorded = [name for name in table.column_names if name not in ("step", "time")]
        renamed_away = set(self.renames().values())
        names = [name for name in self.layer_names() if any(n in recorded for n in self.lineage(name))]
        names += [name for name in recorded if name not in names and name not in renamed_away]
        columns = []
        for name in names:      # a renamed layer's column continues the columns of its earlier names
            column = np.full(len(steps), np.nan, np.float32)
            for earlier in self.lineage(name):
                if earlier in recorded:
                    values = _column_numpy(table.column(earlier)).astype(np.float32)
                    column = np.where(np.isnan(values), column, values)
            columns.append(column)
        values = np.stack(columns, axis=1) if columns else np.zeros((len(steps), 0), np.float32)
        return {"step": steps[mask], "layers": names, "values": values[mask]}


    def _resolve_layer(self, layer) -> str:
        if isinstance(layer, (int, np.integer)):
            structures = self.structures()
            if not structures:
                raise KeyError("no structure recorded yet")
            return structures[-1][1]["layers"][int(layer)]["name"]
        return str(layer)

    def filter_series(self, layer, field: str, start: int | None = None, stop: int | None = None,
                      resolution: int | None = None) -> dict[str, np.ndarray]:
        """Per-filter series of one layer (name, or index into the latest structure) for ``start <= step < stop``,
        across the names a command gave it.

        Returns ``{"step": [T], "filter_ids": [F], "values": [T, F] float32}``; columns are filter ids in order of
        first appearance, NaN where a filter did not exist. With ``resolution=None`` every recorded row is returned at
        the finest resolution still on disk (full resolution for recent records, coarser buckets for older ones, see
        the retention policy). With ``resolution=R`` at most ``R`` rows are returned, taken from the finest pyramid
        level that fits (re-bucketed on the fly if even the coarsest does not). Whenever any row is a bucket,
        ``values`` holds bucket means and ``min``, ``max`` [T, F], ``step_end`` and ``count`` [T] are added
        (``step`` is then the bucket's first step).
        """
        names = self.lineage(self._resolve_layer(layer))
        levels = self._filters.levels(names, int(self.info.get("levels") or 1))
        return read_filter_series(levels, field, start, stop, resolution)

    # -- snapshots --------------------------------------------------------------------------------------------
    def snapshot_steps(self) -> list[int]:
        return sorted({step for step, _, _ in snapshot_files(self.path)})

    def snapshot(self, step: int) -> dict[str, Any]:
        """The snapshot taken at ``step`` (by the run that wrote last, where a resumed run took one there too):
        ``{"body", "arrays", "step", "seq", "time"}``."""
        files = [f for f in snapshot_files(self.path) if f[0] == int(step)]
        if not files:
            raise KeyError(f"no snapshot at step {step}")
        return read_snapshot(files[-1][2], step)

    # -- disk budget ------------------------------------------------------------------------------------------
    def disk(self) -> dict[str, Any] | None:
        """How full the run's disk budget was at the last update of run.json (the recorder rewrites it every 10 s,
        at once when it drops something, and when it closes): ``{"used", "limit", "budget", "free", "min_free",
        "limited_by": "budget" | "free space", "filter_keep": rows each pyramid level keeps, "snapshots": on disk,
        "dropped": counts, "filters_blocked": why per-filter data is not written now, or None}``; None for a
        recording made before the budget existed."""
        self.refresh()
        return self.info.get("disk")

    def dropped(self) -> dict[str, list[dict[str, Any]]]:
        """What the recorder dropped and why (reason ``"budget"``, ``"free space"``, ``"snapshot_keep"`` or
        ``"backlog"``), each entry with ``at_step`` (the latest step then) and ``time``: ``snapshots`` deleted
        (``step``, ``seq``, ``bytes``), ``snapshots_not_written`` (``step``), ``filter_levels`` (``level`` now keeps
        ``keep`` rows, was ``was``), ``filter_steps`` (runs of steps whose per-filter data was not written:
        ``first``, ``last``, ``count``)."""
        self.refresh()
        empty = {"snapshots": [], "snapshots_not_written": [], "filter_levels": [], "filter_steps": []}
        return {**empty, **(self.info.get("dropped") or {})}

    # -- validation -------------------------------------------------------------------------------------------
    def val_predictions(self) -> dict[str, Any]:
        """``{"steps": [T], "epochs": [T], "pred": [T, N] int16 (-1 pads a shorter row), "label": [N],
        "metrics": {name: [T] float64}, "error": why the images have no predictions (the last one said), or None}``."""
        table = self.table("val")
        if table is None:
            return {"steps": np.zeros(0, np.int64), "epochs": np.zeros(0), "pred": np.zeros((0, 0), np.int16),
                    "label": np.zeros(0, np.int16), "metrics": {}, "error": None}
        latest = latest_timeline(_column_numpy(table.column("step")))
        if not latest.all():
            table = table.filter(pa.array(latest))
        steps = _column_numpy(table.column("step"))
        preds = table.column("pred").to_pylist()
        labels = [label for label in table.column("label").to_pylist() if label is not None]
        width = max((len(p) for p in preds if p is not None), default=0)
        pred = np.full((len(preds), width), -1, np.int16)
        for i, p in enumerate(preds):
            if p is not None:
                pred[i, :len(p)] = p
        bodies = [json.loads(b) for b in table.column("body").to_pylist()]
        names = []
        for body in bodies:
            for key in (body.get("metrics") or {}):
                if key not in names:
                    names.append(key)
        metrics = {key: np.asarray([(b.get("metrics") or {}).get(key, np.nan) for b in bodies], np.float64)
                   for key in names}
        return {"steps": steps, "epochs": _column_numpy(table.column("epoch")), "pred": pred,
                "label": np.asarray(labels[-1] if labels else [], np.int16), "metrics": metrics,
                "error": next((body["pred_error"] for body in reversed(bodies) if body.get("pred_error")), None)}

    # -- summary ----------------------------------------------------------------------------------------------
    def last_step(self) -> int | None:
        """The last step recorded (reads only the newest non-empty scalars segment)."""
        for path in reversed(list_segments(self.path / "scalars")):
            _, table, _ = read_segment(path)
            if table is not None and table.num_rows:
                return int(table.column("step")[-1].as_py())  # the last written (a resumed run starts lower)
        events = self.table("events")
        if events is not None and events.column("step").null_count < events.num_rows:
            return int(pc.max(events.column("step")).as_py())
        return None

    def last_write(self) -> float:
        """When the run directory last got data: every step writes a scalar row, and every other message (a
        validation, a snapshot, a command) an event row."""
        latest = (self.path / MARKER).stat().st_mtime
        for name in ("events", "scalars"):
            segments = list_segments(self.path / name)
            if segments:
                try:
                    latest = max(latest, segments[-1].stat().st_mtime)
                except FileNotFoundError:
                    pass
        return latest

    def summary(self) -> dict[str, Any]:
        status = self.status()
        state = status.get("state") if status else None
        closed = self.info.get("closed")
        last_write = self.last_write()
        finished = state in TERMINAL_STATES or closed is not None
        return {"path": str(self.path), "run_id": self.info.get("run_id") or self.path.name,
                "created": self.info.get("created"), "last_step": self.last_step(), "state": state,
                "closed": closed, "last_write": last_write, "finished": finished,
                "live": not finished and time.time() - last_write < LIVE_SECONDS, "disk": self.info.get("disk")}


def open_run(path) -> RunReader:
    """Open a run directory (a directory holding ``run.json``), finished or still being written."""
    return RunReader(path)


def list_runs(log_dir) -> list[dict[str, Any]]:
    """Every run directory under ``log_dir`` (recursively, e.g. ``lightning_logs/version_0/revacnn``), oldest first:
    dicts with path, run_id, created, last_step, state, closed, last_write, finished, live."""
    runs = []
    for root, dirs, files in os.walk(log_dir):
        if MARKER in files:
            try:
                with open(Path(root) / MARKER) as handle:
                    info = json.load(handle)
                if info.get("format") != FORMAT_NAME:
                    continue
                runs.append(RunReader(root).summary())
            except (OSError, ValueError):
                continue
            dirs[:] = []          # a run directory's subfolders hold no further runs
    runs.sort(key=lambda r: (r["created"] or 0, r["path"]))
    return runs
