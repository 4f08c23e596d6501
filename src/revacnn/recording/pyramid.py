"""The per-filter level pyramid of one layer (write side). No torch.

Level 0 keeps every per-filter record; level k holds min/max/mean buckets of 10**k records (``LEVEL_FACTOR``). Old
full-resolution segments are deleted once a coarser level covers them and they fall out of the kept window. Layout
and retention policy: format.py and docs/design.md, "Recording".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from .budget import segment_rows
from .format import LEVEL_FACTOR, quote_layer, to_json
from .stream import SegmentStream


class BucketAccumulator:
    """Per-filter min/max/sum/count of one pyramid bucket, keyed by filter id (columns grow as ids appear)."""

    def __init__(self, n_fields: int) -> None:
        self.n_fields = n_fields
        self.ids = np.zeros(0, np.int64)
        self._same_as = None
        self.pos: dict[int, int] = {}
        self.sum = np.zeros((n_fields, 0))
        self.cnt = np.zeros((n_fields, 0), np.int64)
        self.min = np.zeros((n_fields, 0), np.float32)
        self.max = np.zeros((n_fields, 0), np.float32)
        self.records = 0
        self.first_step: int | None = None
        self.last_step: int | None = None

    def _columns(self, ids: np.ndarray):
        if ids is self._same_as:           # the structure's id array, unchanged since the last record
            return slice(None)
        if len(ids) == len(self.ids) and np.array_equal(ids, self.ids):
            self._same_as = ids
            return slice(None)
        new = [int(i) for i in ids if int(i) not in self.pos]
        if new:
            for i in new:
                self.pos[i] = len(self.pos)
            extra = len(new)
            self.ids = np.concatenate([self.ids, np.asarray(new, np.int64)])
            self.sum = np.concatenate([self.sum, np.zeros((self.n_fields, extra))], axis=1)
            self.cnt = np.concatenate([self.cnt, np.zeros((self.n_fields, extra), np.int64)], axis=1)
            self.min = np.concatenate([self.min, np.full((self.n_fields, extra), np.inf, np.float32)], axis=1)
            self.max = np.concatenate([self.max, np.full((self.n_fields, extra), -np.inf, np.float32)], axis=1)
        self._same_as = None
        if len(ids) == len(self.ids) and np.array_equal(ids, self.ids):
            self._same_as = ids
            return slice(None)
        return np.fromiter((self.pos[int(i)] for i in ids), np.int64, len(ids))

    def _steps(self, first: int, last: int, records: int) -> None:
        self.first_step = first if self.first_step is None else self.first_step
        self.last_step = last
        self.records += records

    def add_records(self, first_step: int, last_step: int, ids: np.ndarray, values: np.ndarray) -> None:
        """Fold ``values`` ``[records, fields, filters]`` (NaN = missing) into the bucket."""
        cols = self._columns(ids)
        present = ~np.isnan(values)
        self.sum[:, cols] += np.where(present, values, 0.0).sum(axis=0, dtype=np.float64)
        self.cnt[:, cols] += present.sum(axis=0)
        self.min[:, cols] = np.fmin(self.min[:, cols], np.fmin.reduce(values, axis=0))
        self.max[:, cols] = np.fmax(self.max[:, cols], np.fmax.reduce(values, axis=0))
        self._steps(first_step, last_step, values.shape[0])

    def merge(self, other: "BucketAccumulator") -> None:
        cols = self._columns(other.ids)
        self.sum[:, cols] += other.sum
        self.cnt[:, cols] += other.cnt
        self.min[:, cols] = np.fmin(self.min[:, cols], other.min)
        self.max[:, cols] = np.fmax(self.max[:, cols], other.max)
        self._steps(other.first_step, other.last_step, other.records)

    def row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        empty = self.cnt == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (self.sum / np.maximum(self.cnt, 1)).astype(np.float32)
        mean[empty] = np.nan
        low = self.min.copy()
        high = self.max.copy()
        low[empty] = np.nan
        high[empty] = np.nan
        return self.ids.copy(), mean, low, high


class LayerSeries:
    """Per-filter series of one layer: level 0 = every record; level k = min/max/mean buckets of 10**k records."""

    def __init__(self, root: Path, name: str, fields: tuple[str, ...], value_type: pa.DataType,
                 levels: int, keep: tuple[int, ...], cap: int | None = None) -> None:
        self.name = name
        self.fields = fields
        self.value_type = value_type
        self.np_type = np.float16 if value_type == pa.float16() else np.float32
        self.levels = levels
        self.keep = keep
        base = root / "filters" / quote_layer(name)
        self.streams = [SegmentStream(base / f"L{k}", segment_rows(keep[k], cap) if k < levels - 1 else 1000)
                        for k in range(levels)]
        self.pending: list[list[tuple]] = [[] for _ in range(levels)]
        self.acc: list[BucketAccumulator | None] = [None] * levels    # acc[k] for k ≥ 1
        self.unfolded: list[tuple] = []     # written at level 0, not yet folded into acc[1] (see _accumulate)
        self.pending_bytes = 0
        self.width = 0                      # filters in the latest record
        self._schemas: dict[int, tuple[bytes, pa.Schema]] = {}

    def add(self, step: int, stamp: float, ids: np.ndarray, values: np.ndarray) -> None:
        self.pending[0].append((step, step, 1, stamp, ids, values))
        self.pending_bytes += values.nbytes
        self.width = len(ids)

    def record_bytes(self) -> int:
        """Bytes one full-resolution record of the layer takes on disk (its latest filter ids)."""
        return len(self.fields) * self.width * np.dtype(self.np_type).itemsize + 16

    def discard_pending(self) -> list[int]:
        """Drop the records not yet written (the disk budget has no room for them); returns their steps."""
        steps = [row[0] for row in self.pending[0]]
        self.pending[0] = []
        self.pending_bytes = 0
        return steps

    def set_keep(self, keep: tuple[int, ...], cap: int | None) -> None:
        """Keep ``keep[k]`` rows at level k from now on, in segments of at most ``cap`` rows (the disk budget's);
        an open segment already longer than the new segment size is finished so it can be retired once it is old."""
        self.keep = keep
        for k in range(self.levels - 1):
            stream = self.streams[k]
            stream.segment_rows = segment_rows(keep[k], cap)
            if stream.rows_in_segment >= stream.segment_rows:
                stream.close()
        self.retire()

    def _accumulate(self) -> None:
        """Fold full-resolution records into the pyramid's buckets, a run of records at a time (one set of numpy
        operations per run, not per record), emitting every bucket that fills.

        A run is folded once it fills the open bucket or the filter ids change after it; until then its records
        wait in ``unfolded``, so a flush every few records does not pay a fold each time. Nothing is lost by waiting:
        only full buckets are ever written."""
        if self.levels < 2:
            return
        rows = self.unfolded + self.pending[0]
        start = 0
        while start < len(rows):
            if self.acc[1] is None:
                self.acc[1] = BucketAccumulator(len(self.fields))
            room = LEVEL_FACTOR - self.acc[1].records
            ids = rows[start][4]
            end = start + 1
            while end < len(rows) and end - start < room and rows[end][4] is ids:
                end += 1
            if end == len(rows) and end - start < room:
                break
            run = rows[start:end]
            self.acc[1].add_records(run[0][0], run[-1][0], ids, np.stack([row[5] for row in run]))
            self._emit_full_buckets(run[-1][3])
            start = end
        self.unfolded = rows[start:]

    def _emit_full_buckets(self, stamp: float) -> None:
        for k in range(1, self.levels):
            acc = self.acc[k]
            if acc is None or acc.records < LEVEL_FACTOR ** k:
                break
            ids_k, mean, low, high = acc.row()
            self.pending[k].append((acc.first_step, acc.last_step, acc.records, stamp, ids_k, (mean, low, high)))
            self.pending_bytes += 3 * mean.nbytes
            if k + 1 < self.levels:
                if self.acc[k + 1] is None:
                    self.acc[k + 1] = BucketAccumulator(len(self.fields))
                self.acc[k + 1].merge(acc)
            self.acc[k] = None

    def _batch(self, level: int, rows: list[tuple]) -> pa.RecordBatch:
        ids = rows[0][4]
        width = len(ids)
        columns = {"step": pa.array(np.array([r[0] for r in rows], np.int64))}
        # Every value column is a slice of one Arrow array converted once from numpy, not a conversion per column
        # (~10 µs each, the largest part of writing a layer's batch).
        block = len(rows) * width
        if level == 0:
            columns["time"] = pa.array(np.array([r[3] for r in rows], np.float64))
            values = pa.array(np.stack([r[5] for r in rows], axis=1).astype(self.np_type).reshape(-1))  # [fields,n,F]
            for f, field in enumerate(self.fields):
                columns[field] = pa.FixedSizeListArray.from_arrays(values.slice(f * block, block), width)
        else:
            columns["step_end"] = pa.array(np.array([r[1] for r in rows], np.int64))
            columns["count"] = pa.array(np.array([r[2] for r in rows], np.int64))
            values = pa.array(np.stack([np.stack([r[5][j] for r in rows], axis=1) for j in range(3)], axis=1)
                              .astype(self.np_type).reshape(-1))                             # [fields, 3, n, F]
            for f, field in enumerate(self.fields):
                for j, suffix in enumerate(("", "/min", "/max")):
                    columns[field + suffix] = pa.FixedSizeListArray.from_arrays(
                        values.slice((3 * f + j) * block, block), width)
        return pa.RecordBatch.from_arrays(list(columns.values()), schema=self._schema(level, ids, columns))

    def _schema(self, level: int, ids: np.ndarray, columns: dict[str, pa.Array]) -> pa.Schema:
        """The level's schema for these filter ids, made once while they stay the same (the same object each
        time lets the stream skip comparing it)."""
        key = ids.tobytes()
        cached = self._schemas.get(level)
        if cached is None or cached[0] != key:
            meta = {"layer": self.name, "level": str(level), "filter_ids": to_json([int(i) for i in ids]),
                    "fields": to_json(list(self.fields))}
            cached = self._schemas[level] = (key, pa.schema([pa.field(name, value.type)
                                                             for name, value in columns.items()], metadata=meta))
        return cached[1]

    def write(self) -> None:
        self._accumulate()
        for level in range(self.levels):
            rows = self.pending[level]
            start = 0
            for i in range(1, len(rows) + 1):       # one batch per run of rows with the same filter ids
                if i == len(rows) or (rows[i][4] is not rows[start][4]
                                      and not np.array_equal(rows[i][4], rows[start][4])):
                    self.streams[level].append(self._batch(level, rows[start:i]))
                    start = i
            self.pending[level] = []
        self.pending_bytes = 0

    def retire(self) -> None:
        """Delete finished segments of level k older than its last ``keep[k]`` rows once level k+1 covers them."""
        for k in range(self.levels - 1):
            stream, coarser = self.streams[k], self.streams[k + 1]
            while stream.closed:
                path, last_row = stream.closed[0]
                old_enough = stream.rows_total - (last_row + 1) >= self.keep[k]
                covered = coarser.rows_total * LEVEL_FACTOR >= last_row + 1
                if not (old_enough and covered):
                    break
                os.unlink(path)
                stream.closed.pop(0)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def abandon(self) -> None:
        for stream in self.streams:
            stream.abandon()
