"""Torch-free reader of run recordings: ``list_runs`` finds them, ``open_run`` reads one (also while it is written).

Every call re-scans the run directory: segments that did not change since the last call come from a cache (keyed by
size and mtime), the segment being appended is re-read, and a truncated last batch (a writer mid-append or killed)
is ignored. Layout and policies: docs/design.md, "Recording".
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .format import FORMAT_NAME, MARKER, TERMINAL_STATES, list_segments, quote_layer, read_segment
from .lineage import renamed_by

__all__ = ["list_runs", "open_run", "RunReader"]

LIVE_SECONDS = 30.0


class _Segments:
    """The readable segments of one stream, cached by (inode, size, mtime); ``parse`` turns a segment's Table into data."""

    def __init__(self, directory: Path, parse: Callable[[pa.Table], Any] | None = None):
        self.directory = directory
        self.parse = parse
        self.cache: dict[Path, tuple] = {}

    def read(self) -> list[tuple[Path, Any]]:
        out = []
        paths = list_segments(self.directory)
        for path in paths:
            try:
                stat = os.stat(path)
            except FileNotFoundError:       # retired between listing and reading
                continue
            key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)   # a re-packed segment is a new inode
            cached = self.cache.get(path)
            if cached is None or cached[0] != key:
                schema, table, _ = read_segment(path)
                data = None
                if table is not None and table.num_rows:
                    data = self.parse(table) if self.parse else table
                cached = (key, data)
                self.cache[path] = cached
            if cached[1] is not None:
                out.append((path, cached[1]))
        for path in set(self.cache) - set(paths):
            del self.cache[path]
        return out

    def table(self) -> pa.Table | None:
        tables = [data for _, data in self.read()]
        if not tables:
            return None
        if len(tables) == 1:
            return tables[0]
        return pa.concat_tables(tables, promote_options="permissive")


class _FilterSegment:
    """One segment of one pyramid level of one layer's per-filter series."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self._columns: dict[str, np.ndarray] = {}
        meta = table.schema.metadata or {}
        self.ids = np.asarray(json.loads(meta.get(b"filter_ids", b"[]")), np.int64)
        self.level = int(meta.get(b"level", b"0"))
        self.starts = self.table.column("step").to_numpy()
        if self.level:
            self.ends = self.table.column("step_end").to_numpy()
            self.counts = self.table.column("count").to_numpy()
        else:
            self.ends = self.starts
            self.counts = np.ones(len(self.starts), np.int64)

    def parts(self, name: str) -> list[tuple[int, np.ndarray]]:
        """One list column as ``[(first row, [rows, F] array), …]``: zero-copy views of the memory-mapped batches,
        or, for a segment of many small batches (a slowly training run), one contiguous copy made once and cached."""
        if name not in self._columns:
            width = len(self.ids)
            chunks = self.table.column(name).chunks
            arrays = []
            for chunk in chunks:
                flat = chunk.values           # batches read from IPC have offset 0; slice if not
                if chunk.offset or len(flat) != len(chunk) * width:
                    flat = flat.slice(chunk.offset * width, len(chunk) * width)
                arrays.append(flat.to_numpy(zero_copy_only=False).reshape(-1, width))
            if len(arrays) > 32:
                arrays = [np.concatenate(arrays)]
            starts = np.cumsum([0] + [len(a) for a in arrays[:-1]]).tolist()
            self._columns[name] = list(zip(starts, arrays))
        return self._columns[name]

    def column(self, name: str) -> np.ndarray:
        """[rows, F] float array of one list column."""
        parts = self.parts(name)
        return parts[0][1] if len(parts) == 1 else np.concatenate([a for _, a in parts])


def _column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if column.null_count == 0:
        return column.to_numpy()
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)     # nulls → NaN
    return np.asarray(column.to_pylist(), dtype=object)


def _latest_timeline(steps: np.ndarray) -> np.ndarray:
    """Which rows, given in the order they were written, no later row supersedes. A run resumed from a checkpoint
    into the same recording starts again at an earlier step, and what it writes replaces every row written before
    from that step on (the branch the checkpoint abandoned), as TensorBoard purges on a restart; so does a new run
    recorded into a directory named for an older one. One run's rows, whose steps only grow, all pass."""
    keep = np.ones(len(steps), bool)
    if len(steps) > 1:
        later_min = np.minimum.accumulate(steps[::-1])[::-1]
        keep[:-1] = steps[:-1] < later_min[1:]
    return keep


def _range_mask(steps: np.ndarray, start: int | None, stop: int | None, ends: np.ndarray | None = None):
    ends = steps if ends is None else ends
    mask = np.ones(len(steps), bool)
    if start is not None:
        mask &= ends >= start
    if stop is not None:
        mask &= steps < stop
    return mask


class RunReader:
    """Reads one run directory (see module docstring). Every accessor sees what has been appended so far."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        if not (self.path / MARKER).is_file():
            raise FileNotFoundError(f"{self.path} is not a revacnn run directory (no {MARKER})")
        self._streams = {name: _Segments(self.path / name) for name in ("events", "scalars", "layers", "val")}
        self._filters: dict[tuple[str, int], _Segments] = {}
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
        for segment in self._lineage_segments(self.lineage(layer), level):
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
        """Structure history: ``[(step, structure body), …]`` in order."""
        return [(row["step"], row["body"]) for row in self._events("structure")]

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
                name, seen = layer["name"], set()
                while name in later and name not in seen:
                    seen.add(name)
                    name = later[name]
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
        renamed = self.renames()
        names = [layer]
        while names[0] in renamed and renamed[names[0]] not in names:
            names.insert(0, renamed[names[0]])
        return names

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

    # -- scalars ----------------------------------------------------------------------------------------------
    def scalars(self, start: int | None = None, stop: int | None = None, every: int = 1) -> dict[str, np.ndarray]:
        """Step scalars as numpy columns (``start <= step < stop``, every ``every``-th row): step, time, seq, epoch,
        batch, loss, samples_per_s, batch_size, per_filter, drops_*, ``lr/<group>``, ``momentum/<group>``,
        ``weight_decay/<group>``, one column per logged metric, and ``not_finite/<name>`` (1.0 where the loss or that
        metric was NaN or ±inf, which the wire sends as nil; NaN elsewhere). Missing values are NaN."""
        table = self.table("scalars")
        if table is None:
            return {"step": np.zeros(0, np.int64)}
        steps = table.column("step").to_numpy(zero_copy_only=False)
        index = np.nonzero(_latest_timeline(steps) & _range_mask(steps, start, stop))[0][::max(1, int(every))]
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
        mask = _latest_timeline(steps) & _range_mask(steps, start, stop)
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

    # -- per-filter series ------------------------------------------------------------------------------------
    def _filter_segments(self, layer: str, level: int) -> list[tuple[Path, _FilterSegment]]:
        key = (layer, level)
        if key not in self._filters:
            self._filters[key] = _Segments(self.path / "filters" / quote_layer(layer) / f"L{level}", _FilterSegment)
        return self._filters[key].read()

    def _lineage_segments(self, names: list[str], level: int) -> list[_FilterSegment]:
        """One level's segments of a layer under each name it had (``lineage``), in order: a recorder writes a
        renamed layer on under its first name, and one that resumed after the rename under the new one."""
        return [segment for name in names for _, segment in self._filter_segments(name, level)]

    def _levels(self, layer: str) -> list[list[_FilterSegment]]:
        """Every level's segments, read coarsest first and back to back: a bucket is written after the records it
        holds, so the finer levels, read last, are at least as new as the coarse ones and nothing falls between
        (read the other way round, records written in between showed up as buckets only)."""
        names = self.lineage(layer)
        levels = [self._lineage_segments(names, level) for level in reversed(range(int(self.info.get("levels") or 1)))]
        levels.reverse()
        while levels and not levels[-1]:
            levels.pop()
        return levels

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
        name = self._resolve_layer(layer)
        levels = self._levels(name)
        empty = {"step": np.zeros(0, np.int64), "filter_ids": np.zeros(0, np.int64),
                 "values": np.zeros((0, 0), np.float32)}
        if not levels:
            return empty
        rows = []   # per level: (starts, ends, segment index, row index)
        for segments in levels:
            if segments:
                starts = np.concatenate([s.starts for s in segments])
                ends = np.concatenate([s.ends for s in segments])
                seg = np.concatenate([np.full(len(s.starts), i) for i, s in enumerate(segments)])
                row = np.concatenate([np.arange(len(s.starts)) for s in segments])
            else:
                starts = ends = seg = row = np.zeros(0, np.int64)
            rows.append((starts, ends, seg, row))
        rows[0] = tuple(column[_latest_timeline(rows[0][0])] for column in rows[0])  # single records, in order
        choice = None
        for level in range(len(levels)):
            selection = self._merge(rows, level)
            count = sum(int(np.count_nonzero(mask & _range_mask(rows[k][0], start, stop, rows[k][1])))
                        for k, mask in selection.items())
            selection = {k: mask & _range_mask(rows[k][0], start, stop, rows[k][1]) for k, mask in selection.items()}
            if resolution is None or count <= resolution or level == len(levels) - 1:
                choice = selection
                break
        parts = [(rows[k][0][mask], np.full(int(mask.sum()), k), rows[k][2][mask], rows[k][3][mask])
                 for k, mask in choice.items() if mask.any()]
        if not parts:
            return empty
        steps, row_level, row_seg, row_in_seg = (np.concatenate(column) for column in zip(*parts))
        order = np.argsort(steps, kind="stable")
        steps, row_level, row_seg, row_in_seg = steps[order], row_level[order], row_seg[order], row_in_seg[order]
        downsampled = bool(np.any(row_level > 0))
        # (level, segment) groups in order of first appearance; filter ids in order of first appearance
        key = row_level * (1 << 32) + row_seg
        _, first_index = np.unique(key, return_index=True)
        group_keys = [(int(row_level[i]), int(row_seg[i])) for i in sorted(first_index)]
        ids: dict[int, int] = {}
        for k, s in group_keys:
            for fid in levels[k][s].ids.tolist():
                if fid not in ids:
                    ids[fid] = len(ids)
        n, width = len(steps), len(ids)
        # every cell is written unless some segment lacks some filter ids (steering): then start from NaN
        covered = all(len(levels[k][s].ids) == width for k, s in group_keys)
        blank = np.empty if covered else (lambda shape, dtype: np.full(shape, np.nan, dtype))
        values = blank((n, width), np.float32)
        low = blank((n, width), np.float32) if downsampled else None
        high = blank((n, width), np.float32) if downsampled else None
        ends = np.empty(n, np.int64)
        counts = np.empty(n, np.int64)
        for k, s in group_keys:
            out_rows = np.nonzero(key == k * (1 << 32) + s)[0]
            seg_rows = row_in_seg[out_rows]
            segment = levels[k][s]
            cols = np.asarray([ids[int(fid)] for fid in segment.ids], np.int64)
            contiguous = len(cols) and cols[-1] - cols[0] + 1 == len(cols) and np.all(np.diff(cols) == 1)
            col_index = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
            row_block = (slice(int(out_rows[0]), int(out_rows[-1]) + 1)
                         if out_rows[-1] - out_rows[0] + 1 == len(out_rows) else out_rows)
            seg_block = (slice(int(seg_rows[0]), int(seg_rows[-1]) + 1)
                         if seg_rows[-1] - seg_rows[0] + 1 == len(seg_rows) else seg_rows)

            def put(target, column):
                if isinstance(row_block, slice) and isinstance(col_index, slice) and isinstance(seg_block, slice):
                    first, last = seg_block.start, seg_block.stop      # copy straight from each batch
                    for offset, part in segment.parts(column):
                        lo, hi = max(first, offset), min(last, offset + len(part))
                        if lo < hi:
                            out = row_block.start + lo - first
                            target[out:out + hi - lo, col_index] = part[lo - offset:hi - offset]
                    return
                data = segment.column(column)[seg_block]
                if isinstance(row_block, slice) and isinstance(col_index, slice):
                    target[row_block, col_index] = data
                else:
                    target[np.ix_(np.arange(n)[row_block], np.arange(width)[col_index])] = data

            put(values, field)
            if downsampled:
                put(low, field if k == 0 else field + "/min")
                put(high, field if k == 0 else field + "/max")
            ends[out_rows] = segment.ends[seg_rows]
            counts[out_rows] = segment.counts[seg_rows]
        out = {"step": steps, "filter_ids": np.fromiter(ids, np.int64, width), "values": values}
        if resolution is not None and n > resolution:
            return self._rebucket(out, low, high, ends, counts, resolution)
        if downsampled:
            out.update({"min": low, "max": high, "step_end": ends, "count": counts})
        return out

    @staticmethod
    def _merge(rows, level: int) -> dict[int, np.ndarray]:
        """Rows of every level that together cover the run once: level ``level`` where it has data, coarser
        levels before it, finer levels after its last complete bucket."""
        selection = {k: np.zeros(len(rows[k][0]), bool) for k in range(len(rows))}
        starts, ends = rows[level][0], rows[level][1]
        selection[level][:] = True
        first = starts[0] if len(starts) else math.inf
        last = ends[-1] if len(ends) else -math.inf
        for k in range(level + 1, len(rows)):
            older = rows[k][0] < first
            if not older.any():
                continue
            boundary = rows[k][1][older][-1]
            for j in selection:          # finer rows the last older bucket already covers
                if j < k:
                    selection[j] &= rows[j][0] > boundary
            selection[k] = older
            first = rows[k][0][older][0]
        for k in range(level - 1, -1, -1):
            newer = rows[k][0] > last
            selection[k] |= newer
            if newer.any():
                last = rows[k][1][newer][-1]
        return selection

    @staticmethod
    def _rebucket(out, low, high, ends, counts, resolution: int) -> dict[str, np.ndarray]:
        values = out["values"]
        if low is None:
            low, high = values, values
        n = len(values)
        size = math.ceil(n / resolution)
        groups = np.arange(n) // size
        bounds = np.r_[0, np.nonzero(np.diff(groups))[0] + 1]
        weights = np.where(np.isnan(values), 0.0, counts[:, None].astype(np.float64))
        total = np.add.reduceat(weights, bounds, axis=0)
        summed = np.add.reduceat(np.nan_to_num(values.astype(np.float64)) * weights, bounds, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (summed / total).astype(np.float32)
        mean[total == 0] = np.nan
        new_low = np.fmin.reduceat(low, bounds, axis=0)
        new_high = np.fmax.reduceat(high, bounds, axis=0)
        last = np.r_[bounds[1:] - 1, n - 1]
        return {"step": out["step"][bounds], "filter_ids": out["filter_ids"], "values": mean, "min": new_low,
                "max": new_high, "step_end": ends[last], "count": np.add.reduceat(counts, bounds)}

    # -- snapshots --------------------------------------------------------------------------------------------
    def _snapshot_files(self) -> list[tuple[int, int, Path]]:
        directory = self.path / "snapshots"
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        written = []
        for name in names:
            if name.startswith("snapshot-") and name.endswith(".safetensors"):
                try:
                    _, step, seq = name[:-len(".safetensors")].split("-")
                    path = directory / name
                    written.append((path.stat().st_mtime_ns, int(step), int(seq), path))
                except (ValueError, FileNotFoundError):
                    continue
        written.sort()  # in the order written (a resumed run's ``seq`` starts again)
        latest = _latest_timeline(np.asarray([step for _, step, _, _ in written], np.int64))
        return sorted((step, seq, path) for (_, step, seq, path), keep in zip(written, latest) if keep)

    def snapshot_steps(self) -> list[int]:
        return sorted({step for step, _, _ in self._snapshot_files()})

    def snapshot(self, step: int) -> dict[str, Any]:
        """The snapshot taken at ``step`` (by the run that wrote last, where a resumed run took one there too):
        ``{"body", "arrays", "step", "seq", "time"}``."""
        from safetensors import safe_open

        files = [f for f in self._snapshot_files() if f[0] == int(step)]
        if not files:
            raise KeyError(f"no snapshot at step {step}")
        path = files[-1][2]
        arrays = {}
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            for key in handle.keys():
                arrays[key] = handle.get_tensor(key)
        return {"body": json.loads(meta.get("body", "{}")), "arrays": arrays, "step": int(meta.get("step", step)),
                "seq": int(meta.get("seq", 0)), "time": float(meta.get("time", "nan"))}

    # -- validation -------------------------------------------------------------------------------------------
    def val_predictions(self) -> dict[str, Any]:
        """``{"steps": [T], "epochs": [T], "pred": [T, N] int16 (-1 pads a shorter row), "label": [N],
        "metrics": {name: [T] float64}, "error": why the images have no predictions (the last one said), or None}``."""
        table = self.table("val")
        if table is None:
            return {"steps": np.zeros(0, np.int64), "epochs": np.zeros(0), "pred": np.zeros((0, 0), np.int16),
                    "label": np.zeros(0, np.int16), "metrics": {}, "error": None}
        latest = _latest_timeline(_column_numpy(table.column("step")))
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
                "live": not finished and time.time() - last_write < LIVE_SECONDS}


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
