"""``SegmentStream``: one append-only stream of Arrow IPC segment files (events, scalars, a pyramid level). No torch.

Rolls to a new segment on a schema change or after ``segment_rows`` rows, adds the ``_commit`` column a reader checks
(format.py), and re-packs a finished segment of many small batches into one batch. Layout: format.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from .format import COMMIT_COLUMN, COMMIT_MAGIC, list_segments, segment_name

COMPACT_BATCHES = 16            # a finished segment with more batches than this is re-packed into one batch
COMPACT_MAX_BYTES = 256 << 20
_WARM = False


def warm_up() -> None:
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


class SegmentStream:
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

