"""``RunRecorder``: writes every published message into a run directory from a background thread. No torch.

The publishing thread only calls ``submit`` (a non-blocking append to a bounded inbox). A daemon thread wakes every
``flush_interval`` seconds (0.5 s by default; sooner when 32 MB are waiting, or on ``flush``/``close``), turns the
messages into rows and appends them as Arrow IPC record batches to segment files — waking once per interval rather
than once per message keeps its share of the GIL, which the training thread competes for, small. It writes snapshots
as safetensors files (temp name, then rename) and retires old full-resolution segments once coarser pyramid levels
cover them. Errors never reach the caller: the first one is stored in ``error``, warned about once, and the recorder
stops writing (everything submitted afterwards counts as a drop). Layout and policy: docs/design.md, "Recording".
"""

from __future__ import annotations

import json
import logging
import math
import os
import collections
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..wire.protocol import FILTER_FIELDS, Message
from .format import COMMIT_COLUMN, COMMIT_MAGIC, FORMAT_NAME, FORMAT_VERSION, LEVEL_FACTOR, MARKER, list_segments, quote_layer, segment_name
from .lineage import renamed_by

log = logging.getLogger(__name__)

_STOP = object()
_FLUSH = object()
_EARLY_FLUSH_BYTES = 32 << 20   # wake the writer before its interval once this much waits in the inbox
_INT_SCALARS = ("step", "epoch", "batch", "revision", "batch_size", "seq", "drops_telemetry", "drops_recording")
_FIXED_SCALARS = ("step", "time", "seq", "epoch", "batch", "loss", "samples_per_s", "batch_size", "per_filter",
                  "drops_telemetry", "drops_recording")
_GROUP_KEYS = ("lr", "momentum", "weight_decay")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


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


def _scalar_row(body: dict[str, Any], sent: float, seq: int, drops: Any) -> dict[str, Any]:
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


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)          # atomic; no fsync (it can stall for seconds on a busy disk)


_WARM = False
COMPACT_BATCHES = 16            # a finished segment with more batches than this is re-packed into one batch
COMPACT_MAX_BYTES = 256 << 20


def _warm_up() -> None:
    """Pay pyarrow's and safetensors' first-use costs (lazy imports, pyarrow imports pandas on its first
    conversion: ~1 s on a busy machine) when the recorder is created, not during the first flush, which would
    otherwise widen the window a SIGKILL can lose at the start of a run."""
    global _WARM
    if _WARM:
        return
    import safetensors.numpy  # noqa: F401

    sink = pa.BufferOutputStream()
    batch = pa.RecordBatch.from_arrays([pa.array([0], pa.int64()), pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(2, np.float32)), 2)], names=["a", "b"])
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    _WARM = True


class _Stream:
    """Append-only segmented Arrow IPC stream. Rolls to a new segment on a schema change or after ``segment_rows``."""

    def __init__(self, directory: Path, segment_rows: int) -> None:
        self.directory = directory
        self.segment_rows = segment_rows
        self.schema: pa.Schema | None = None
        self.sink = None
        self.writer = None
        self.path: Path | None = None
        self.index = 0
        self.rows_in_segment = 0
        self.rows_total = 0
        self.segment_first_row = 0
        self.batches_in_segment = 0
        self.closed: list[tuple[Path, int]] = []    # (path, index of its last row) of finished segments
        self._in_schema: pa.Schema | None = None
        self._out_schema: pa.Schema | None = None
        self._marks = pa.array(np.zeros(0, np.int64))

    def append(self, batch: pa.RecordBatch) -> None:
        if batch.schema is not self._in_schema:    # writers hand the same schema object while nothing changes
            self._in_schema = batch.schema
            self._out_schema = batch.schema.append(pa.field(COMMIT_COLUMN, pa.int64()))
        if len(self._marks) < batch.num_rows:
            self._marks = pa.array(np.full(max(batch.num_rows, 2 * len(self._marks), 64), COMMIT_MAGIC, np.int64))
        batch = pa.RecordBatch.from_arrays([*batch.columns, self._marks.slice(0, batch.num_rows)],
                                           schema=self._out_schema)
        offset = 0
        while offset < batch.num_rows:
            if (self.writer is None or self.rows_in_segment >= self.segment_rows
                    or (batch.schema is not self.schema and not batch.schema.equals(self.schema, check_metadata=True))):
                self._roll(batch.schema)
            part = batch.slice(offset, self.segment_rows - self.rows_in_segment)
            self.writer.write_batch(part)
            self.batches_in_segment += 1
            self.rows_in_segment += part.num_rows
            self.rows_total += part.num_rows
            offset += part.num_rows
        self.sink.flush()

    def _roll(self, schema: pa.Schema) -> None:
        self.close()
        if self.index == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            existing = list_segments(self.directory)
            self.index = int(existing[-1].name[4:10]) if existing else 0
        self.index += 1
        self.path = self.directory / segment_name(self.index)
        # Buffered, and flushed after every append: one write(2) into the page cache per batch, where the IPC
        # writer alone issues one per buffer (~11 for a layer's batch).
        self.sink = pa.BufferedOutputStream(pa.OSFile(str(self.path), "wb"), 1 << 16)
        self.writer = pa.ipc.new_stream(self.sink, schema)
        self.schema = schema
        self.rows_in_segment = 0
        self.batches_in_segment = 0
        self.segment_first_row = self.rows_total

    def close(self) -> None:
        if self.writer is not None:
            writer, sink, self.writer, self.sink = self.writer, self.sink, None, None
            try:
                writer.close()       # end-of-stream marker
            finally:
                sink.close()
            if self.batches_in_segment > COMPACT_BATCHES:
                self._compact(self.path)
            if self.rows_in_segment:
                self.closed.append((self.path, self.rows_total - 1))

    @staticmethod
    def _compact(path: Path) -> None:
        """Re-pack a finished segment of many small batches (a slowly training run flushes one row at a time) into
        one batch: same rows, same bytes per row, written to a temp file and renamed over the segment, so a reader
        sees either the old file or the new one. Readers then parse one batch instead of hundreds."""
        if path.stat().st_size > COMPACT_MAX_BYTES:
            return
        table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all().combine_chunks()
        tmp = path.with_name(f".{path.name}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
        os.replace(tmp, path)

    def abandon(self) -> None:
        """After a write error: drop the file handles without writing anything more."""
        sink, self.writer, self.sink = self.sink, None, None
        if sink is not None:
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - the disk already failed; nothing more to do
                pass


class _Accumulator:
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

    def merge(self, other: "_Accumulator") -> None:
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


class _LayerSeries:
    """Per-filter series of one layer: level 0 = every record; level k = min/max/mean buckets of 10**k records."""

    def __init__(self, root: Path, name: str, fields: tuple[str, ...], value_type: pa.DataType,
                 levels: int, keep: tuple[int, ...]) -> None:
        self.name = name
        self.fields = fields
        self.value_type = value_type
        self.np_type = np.float16 if value_type == pa.float16() else np.float32
        self.levels = levels
        self.keep = keep
        base = root / "filters" / quote_layer(name)
        self.streams = [_Stream(base / f"L{k}", max(50, keep[k] // 4) if k < levels - 1 else 1000)
                        for k in range(levels)]
        self.pending: list[list[tuple]] = [[] for _ in range(levels)]
        self.acc: list[_Accumulator | None] = [None] * levels    # acc[k] for k ≥ 1
        self.unfolded: list[tuple] = []     # written at level 0, not yet folded into acc[1] (see _accumulate)
        self.pending_bytes = 0
        self._schemas: dict[int, tuple[bytes, pa.Schema]] = {}

    def add(self, step: int, stamp: float, ids: np.ndarray, values: np.ndarray) -> None:
        self.pending[0].append((step, step, 1, stamp, ids, values))
        self.pending_bytes += values.nbytes

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
                self.acc[1] = _Accumulator(len(self.fields))
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
                    self.acc[k + 1] = _Accumulator(len(self.fields))
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
            meta = {"layer": self.name, "level": str(level), "filter_ids": _json([int(i) for i in ids]),
                    "fields": _json(list(self.fields))}
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

    def retire(self) -> list[Path]:
        """Delete finished segments of level k older than its last ``keep[k]`` rows once level k+1 covers them."""
        removed = []
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
                removed.append(path)
        return removed

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def abandon(self) -> None:
        for stream in self.streams:
            stream.abandon()


class RunRecorder:
    """Records every message submitted to it into ``run_dir`` (created), from its own background thread.

    ``float16_filters`` stores per-filter series as float16 (the reader returns float32). ``full_records``: how many
    of the most recent per-filter records each layer keeps at full resolution; ``keep_buckets``: how many of the
    most recent buckets each coarser level keeps; the coarsest level (buckets of ``10**(levels-1)`` records) keeps
    everything. ``flush_interval``: seconds between appends to disk (bounds what a SIGKILL can lose).
    """

    def __init__(self, run_dir, float16_filters: bool = False, queue_size: int = 10000, *,
                 full_records: int = 2000, keep_buckets: int = 1000, levels: int = 5,
                 flush_interval: float = 0.5, status_every: float = 5.0) -> None:
        self.run_dir = Path(run_dir)
        self.float16_filters = float16_filters
        self.flush_interval = flush_interval
        self.status_every = status_every
        self.levels = max(1, int(levels))
        self.keep = tuple([max(LEVEL_FACTOR * 2, int(full_records))]
                          + [max(LEVEL_FACTOR * 2, int(keep_buckets))] * (self.levels - 1))
        self.drops = 0
        self.error: str | None = None
        self.queue_size = queue_size
        self._inbox: collections.deque = collections.deque()
        self._inbox_bytes = 0
        self._wake = threading.Event()
        self._lock = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._closed = False
        self._dead = False
        self._warned = False
        # writer-thread state
        self._info: dict[str, Any] = {}
        self._structure: dict | None = None
        self._layer_ids: dict[str, np.ndarray] = {}
        self._ids_by_revision: dict[int, dict[str, np.ndarray]] = {}
        self._series: dict[str, _LayerSeries] = {}
        self._first_name: dict[str, str] = {}          # a layer renamed by steering -> the name its series has
        self._streams: dict[str, _Stream] = {}
        self._pending: dict[str, list] = {"events": [], "scalars": [], "layers": [], "val": []}
        self._scalar_columns: dict[str, None] = {}     # an ordered set: columns in order of appearance
        self._last_status: tuple[str | None, float] = (None, -math.inf)
        self._mismatch_warned = False
        self._bad_message_warned = False
        self._inode = None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._inode = os.stat(self.run_dir).st_ino
            self._info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "run_id": None, "created": time.time(),
                          "pid": os.getpid(), "host": socket.gethostname(), "float16_filters": float16_filters,
                          "full_records": self.keep[0], "keep_buckets": self.keep[1] if self.levels > 1 else None,
                          "levels": self.levels, "level_factor": LEVEL_FACTOR, "closed": None}
            _write_json_atomic(self.run_dir / MARKER, self._info)
            for name in self._pending:
                self._streams[name] = _Stream(self.run_dir / name, 50000)
        except Exception as error:  # noqa: BLE001 - never raise into training
            self._fail(error)
        _warm_up()
        self._thread = threading.Thread(target=self._run, name="revacnn-recorder", daemon=True)
        self._thread.start()

    # -- training side ----------------------------------------------------------------------------------------
    def submit(self, message: Message) -> bool:
        """Queue ``message`` for writing; never blocks. False (and ``drops`` + 1) when full, closed or failed."""
        if self._dead or self._closed:
            self._count_drop()
            return False
        size = sum(getattr(array, "nbytes", 0) for array in message.arrays.values())
        with self._lock:
            if len(self._inbox) >= self.queue_size:
                self.drops += 1
                return False
            self._inbox.append(message)
            self._submitted += 1
            self._inbox_bytes += size
            urgent = self._inbox_bytes > _EARLY_FLUSH_BYTES
        if urgent:
            self._wake.set()
        return True

    def _count_drop(self) -> None:
        with self._lock:
            self.drops += 1

    @property
    def queue_length(self) -> int:
        """Messages waiting for the writer thread (reported in status ``queue.recording``)."""
        return len(self._inbox)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far is on disk (or dropped after an error). False on timeout."""
        with self._lock:
            target = self._submitted
            if not self._thread.is_alive():
                return self._done >= target
            self._inbox.append(_FLUSH)
        self._wake.set()
        with self._lock:
            return self._lock.wait_for(lambda: self._done >= target or not self._thread.is_alive(), timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush and close every file; idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._inbox.append(_STOP)
        self._wake.set()
        self._thread.join(timeout)

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writer thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        processed = 0
        next_flush = time.monotonic() + self.flush_interval
        stop = False
        while not stop:
            self._wake.wait(max(0.0, next_flush - time.monotonic()))
            self._wake.clear()
            with self._lock:
                items = list(self._inbox)
                self._inbox.clear()
                self._inbox_bytes = 0
            flush = False
            for item in items:
                if item is _STOP:
                    stop = True
                elif item is _FLUSH:
                    flush = True
                else:
                    self._handle_safely(item)
                    processed += 1
            pending = sum(series.pending_bytes for series in self._series.values())
            if stop or flush or time.monotonic() >= next_flush or pending > _EARLY_FLUSH_BYTES:
                if not self._dead:
                    try:
                        self._write_out()
                        if stop:
                            self._finish()
                    except Exception as error:  # noqa: BLE001
                        self._fail(error)
                next_flush = time.monotonic() + self.flush_interval
                with self._lock:
                    self._done = processed
                    self._lock.notify_all()
        with self._lock:
            self._done = processed
            self._lock.notify_all()

    def _handle_safely(self, message: Message) -> None:
        if self._dead:
            self._count_drop()
            return
        try:
            self._handle(message)
        except OSError as error:             # the disk: stop recording
            self._fail(error)
            self._count_drop()
        except Exception as error:  # noqa: BLE001 - one malformed message: skip it, keep recording
            self._count_drop()
            if not self._bad_message_warned:
                self._bad_message_warned = True
                log.warning("revacnn recording: skipped a %s message that could not be recorded (%s: %s)",
                            getattr(message, "type", "?"), type(error).__name__, error)

    def _fail(self, error: BaseException) -> None:
        self._dead = True
        self.error = f"{type(error).__name__}: {error}"
        for series in self._series.values():
            series.abandon()
        for stream in self._streams.values():
            stream.abandon()
        if not self._warned:
            self._warned = True
            text = f"revacnn: run recording into {self.run_dir} stopped: {self.error}"
            log.warning(text)
            warnings.warn(text, RuntimeWarning, stacklevel=2)

    def _event(self, message: Message, step: Any = None) -> None:
        step = message.body.get("step") if step is None else step
        self._pending["events"].append((message.seq, message.time, message.type,
                                        step if isinstance(step, int) else None, _json(message.body)))

    def _handle(self, message: Message) -> None:
        kind, body = message.type, message.body
        if message.run and self._info.get("run_id") is None:
            self._info["run_id"] = message.run
            _write_json_atomic(self.run_dir / MARKER, self._info)
        if kind == "step":
            self._handle_step(message)
        elif kind == "steps":
            drops = message.body.get("drops")
            for body in message.body.get("rows") or []:
                self._pending["scalars"].append(_scalar_row(body, message.time, message.seq, drops))
        elif kind == "structure":
            self._structure = body
            self._layer_ids = {}
            for layer in body.get("layers", []):
                ids = layer.get("filter_ids")
                if ids is None:
                    ids = list(range(int(layer.get("out", 0))))
                self._layer_ids[layer["name"]] = np.asarray(ids, np.int64)
            if isinstance(body.get("revision"), int):
                self._ids_by_revision[body["revision"]] = self._layer_ids
            self._event(message)
        elif kind == "snapshot":
            self._write_snapshot(message)
            self._event(message)
        elif kind == "val":
            pred = message.arrays.get("pred")
            label = message.arrays.get("label")
            self._pending["val"].append((body.get("step"), body.get("epoch"), message.time, message.seq,
                                         _json(body), pred, label))
            self._event(message)
        elif kind == "ack":
            self._follow_renames(body)
            self._event(message)
        elif kind == "status":
            state = body.get("state")
            last_state, last_time = self._last_status
            if state != last_state or time.monotonic() - last_time >= self.status_every:
                self._last_status = (state, time.monotonic())
                self._event(message)
        else:
            self._event(message)

    def _follow_renames(self, ack: dict) -> None:
        """A layer renamed by a command (insert_layer moves ``conv2`` into a Sequential as ``conv2.0``) keeps its
        filters and their ids: its per-filter series goes on in the directory of its first name, so the record and
        its buckets continue across the change (readers follow the renames in the acks)."""
        for old, new in renamed_by(ack).items():
            self._first_name[new] = self._first_name.get(old, old)

    def _handle_step(self, message: Message) -> None:
        body = message.body
        step = body.get("step")
        row = _scalar_row(body, message.time, message.seq, body.get("drops"))
        filters = message.arrays.get("filters")
        names = body.get("layer_names")
        if names is None and self._structure is not None:
            names = [layer["name"] for layer in self._structure.get("layers", [])]
        if filters is not None and names:
            filters = np.asarray(filters, np.float32)
            fields = tuple(body.get("filter_fields") or FILTER_FIELDS)
            # the structure revision the arrays are shaped by (protocol: body.revision); else the latest structure
            layer_ids = self._ids_by_revision.get(body.get("revision"), self._layer_ids)
            widths = [len(layer_ids.get(name, ())) for name in names]
            if filters.ndim != 2 or filters.shape[0] != len(fields) or sum(widths) != filters.shape[1] \
                    or any(name not in layer_ids for name in names):
                if not self._mismatch_warned:
                    self._mismatch_warned = True
                    log.warning("revacnn recording: step %s per-filter buffer %s does not match the structure; "
                                "per-filter data of such steps is not recorded", step, filters.shape)
            else:
                start = 0
                for name, width in zip(names, widths):
                    first = self._first_name.get(name, name)
                    series = self._series.get(first)
                    if series is None or series.fields != fields:
                        if series is not None:
                            series.write()
                            series.close()
                        series = self._series[first] = _LayerSeries(
                            self.run_dir, first, fields, pa.float16() if self.float16_filters else pa.float32(),
                            self.levels, self.keep)
                    series.add(step, message.time, layer_ids[name], filters[:, start:start + width].copy())
                    start += width
        layers = message.arrays.get("layers")
        if layers is not None and names and len(layers) == len(names):
            self._pending["layers"].append((step, message.time, tuple(names), np.asarray(layers, np.float32)))
        self._pending["scalars"].append(row)      # last: a message that raised above leaves no scalar row

    def _write_snapshot(self, message: Message) -> None:
        from safetensors.numpy import save_file

        body = message.body
        step = int(body.get("step") or 0)
        directory = self.run_dir / "snapshots"
        directory.mkdir(exist_ok=True)
        name = f"snapshot-{step:010d}-{int(message.seq):010d}.safetensors"
        tmp = directory / f".{name}.tmp"
        arrays = {key: np.ascontiguousarray(value) for key, value in message.arrays.items()}
        metadata = {"type": "snapshot", "step": str(step), "seq": str(message.seq), "time": repr(message.time),
                    "run": message.run, "body": _json(body)}
        save_file(arrays, str(tmp), metadata=metadata)
        os.replace(tmp, directory / name)

    # -- batches ----------------------------------------------------------------------------------------------
    def _write_out(self) -> None:
        if self._inode is not None:
            try:
                same = os.stat(self.run_dir).st_ino == self._inode
            except FileNotFoundError:
                same = False
            if not same:
                raise FileNotFoundError(f"run directory {self.run_dir} vanished")
        for series in self._series.values():
            series.write()
        pending = self._pending
        if pending["layers"]:
            rows = pending["layers"]
            start = 0
            for i in range(1, len(rows) + 1):
                if i == len(rows) or rows[i][2] != rows[start][2]:
                    chunk = rows[start:i]
                    names = chunk[0][2]
                    values = np.stack([r[3] for r in chunk])
                    arrays = [pa.array([r[0] for r in chunk], pa.int64()), pa.array([r[1] for r in chunk])]
                    arrays += [pa.array(values[:, j]) for j in range(len(names))]
                    self._streams["layers"].append(pa.RecordBatch.from_arrays(arrays, names=["step", "time", *names]))
                    start = i
        if pending["scalars"]:
            rows = pending["scalars"]
            for row in rows:
                self._scalar_columns.update(dict.fromkeys(row))
            arrays = []
            for key in self._scalar_columns:
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
            self._streams["scalars"].append(pa.RecordBatch.from_arrays(arrays, names=list(self._scalar_columns)))
        if pending["val"]:
            rows = pending["val"]
            arrays = [pa.array([r[0] for r in rows], pa.int64()), pa.array([r[1] for r in rows], pa.int64()),
                      pa.array([r[2] for r in rows], pa.float64()), pa.array([r[3] for r in rows], pa.int64()),
                      pa.array([r[4] for r in rows], pa.string()),
                      pa.array([None if r[5] is None else np.asarray(r[5], np.int16) for r in rows],
                               pa.list_(pa.int16())),
                      pa.array([None if r[6] is None else np.asarray(r[6], np.int16) for r in rows],
                               pa.list_(pa.int16()))]
            self._streams["val"].append(pa.RecordBatch.from_arrays(
                arrays, names=["step", "epoch", "time", "seq", "body", "pred", "label"]))
        if pending["events"]:
            rows = pending["events"]
            arrays = [pa.array([r[0] for r in rows], pa.int64()), pa.array([r[1] for r in rows], pa.float64()),
                      pa.array([r[2] for r in rows], pa.string()), pa.array([r[3] for r in rows], pa.int64()),
                      pa.array([r[4] for r in rows], pa.string())]
            self._streams["events"].append(pa.RecordBatch.from_arrays(arrays, names=["seq", "time", "type", "step", "body"]))
        for key in pending:
            pending[key] = []
        for series in self._series.values():
            series.retire()

    def _finish(self) -> None:
        for series in self._series.values():
            series.close()
        for stream in self._streams.values():
            stream.close()
        self._info["closed"] = time.time()
        _write_json_atomic(self.run_dir / MARKER, self._info)

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            if not self._closed and self._thread.is_alive():
                self.close(timeout=5)
        except Exception:  # noqa: BLE001
            pass
