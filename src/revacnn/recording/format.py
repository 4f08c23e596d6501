"""On-disk layout of a run recording, shared by the writer and the reader. No torch.

A run directory holds (see docs/design.md, "Recording"):

    run.json                      marker + run metadata, replaced atomically (temp file + rename)
    events/seg-000001.arrows      every structure/hparams/ack/status/snapshot/val message: seq, time, type, step, body (JSON)
    scalars/seg-….arrows          one row per step (a ``step`` message or a ``steps`` row): step, epoch, loss,
                                  samples_per_s, lr/<g>, …, every metric
    layers/seg-….arrows           one row per per-filter step: step, then one float32 column per monitored layer
    val/seg-….arrows              one row per val message: step, epoch, metrics (JSON), pred and label (list<int16>)
    filters/<layer>/L<k>/seg-….arrows   per-filter series of one layer at pyramid level k (buckets of 10**k records)
    snapshots/snapshot-<step>-<seq>.safetensors

Every ``.arrows`` file is an Arrow IPC *stream*: a schema message followed by record batches, each one
self-delimiting (continuation marker, metadata length, metadata, body whose length is in the metadata). The writer
only appends; a segment that was being written when the process died ends in a truncated message, which
``read_segment`` detects (pyarrow refuses to read past the bytes that exist) and drops. Data is never modified in
place: the only rewrite is that a *finished* segment of many small batches is re-packed into one batch (same rows,
temp file + rename), and whole finished per-filter segments are deleted once coarser pyramid levels cover them.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_NAME = "revacnn-recording"
FORMAT_VERSION = 1
MARKER = "run.json"
SEGMENT_SUFFIX = ".arrows"
LEVEL_FACTOR = 10          # a level-k bucket aggregates 10**k per-filter records
# Every record batch ends with this int64 column, one value per row. Arrow lays a batch's buffers out in column
# order, so this is the last thing in the batch body: a body whose tail is missing or zero-filled (a torn write
# after a machine crash) fails the check instead of being read as data.
COMMIT_COLUMN = "_commit"
COMMIT_MAGIC = 0x52455641434E4E31   # "REVACNN1"


def quote_layer(name: str) -> str:
    """A layer name as a directory name: every character outside [A-Za-z0-9._-] becomes %XX (UTF-8).

    ``urllib.parse.quote`` never quotes ``~``; directories written before quote it, so it is quoted here too."""
    text = urllib.parse.quote(name, safe="").replace("~", "%7E")
    return text if text not in ("", ".", "..") else "%" + text.encode().hex()


def to_json(value: Any) -> str:
    """Compact JSON of a message body or schema metadata; numpy values become plain numbers and lists."""
    return json.dumps(value, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` as JSON: a temp file renamed over it, so a reader sees the old or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)          # atomic; no fsync (it can stall for seconds on a busy disk)


def segment_name(index: int) -> str:
    return f"seg-{index:06d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[Path]:
    """Segments of one stream in write order (names sort in order)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [directory / name for name in sorted(names)
            if name.startswith("seg-") and name.endswith(SEGMENT_SUFFIX)]


def read_segment(path: Path) -> tuple[pa.Schema | None, pa.Table | None, bool]:
    """The complete record batches of one segment as a Table (one chunk per batch), and False when a damaged or
    truncated tail was dropped.

    A truncated tail (crash, or a writer still appending) is detected and ignored: pyarrow reads each message's
    length first and raises when fewer bytes exist, so a partial batch is never returned; a batch whose trailing
    ``_commit`` marks are not intact is dropped with everything after it. A missing, empty or unreadable file gives
    ``(None, None, False)``. The returned data points into a memory map that stays alive as long as it does.
    """
    def open_reader():
        return pa.ipc.open_stream(pa.memory_map(str(path), "r"))

    try:
        reader = open_reader()
    except (pa.ArrowException, OSError, ValueError):
        return None, None, False
    schema = reader.schema
    clean = True
    try:
        batches = reader.read_all().to_batches()           # fast path: a complete segment, read in C++
    except (pa.ArrowException, OSError, ValueError):
        batches, clean = [], False
        reader = open_reader()
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowException, OSError, ValueError):
                break
    table = pa.Table.from_batches(batches, schema)
    commit = schema.get_field_index(COMMIT_COLUMN)
    if commit >= 0:
        marks = table.column(commit)
        good = marks.to_numpy() == COMMIT_MAGIC if marks.null_count == 0 else np.zeros(len(table), bool)
        if not good.all():
            clean = False
            first_bad = int(np.argmin(good))
            starts = np.cumsum([0] + [b.num_rows for b in batches])
            keep = int(np.searchsorted(starts, first_bad, side="right")) - 1    # batches wholly before it
            table = pa.Table.from_batches(batches[:keep], schema)
        table = table.remove_column(commit)
        schema = table.schema
    return schema, table, clean
