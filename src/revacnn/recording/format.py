"""On-disk layout of a run recording, shared by the writer and the reader. No torch.

A run directory holds (see docs/design.md, "Recording"):

    run.json                      marker + run metadata, replaced atomically (temp file + rename)
    events/seg-000001.arrows      every structure/hparams/ack/status/snapshot/val message: seq, time, type, step, body (JSON)
    scalars/seg-….arrows          one row per step message: step, epoch, loss, samples_per_s, lr/<g>, …, every metric
    layers/seg-….arrows           one row per per-filter step: step, then one float32 column per monitored layer
    val/seg-….arrows              one row per val message: step, epoch, metrics (JSON), pred and label (list<int16>)
    filters/<layer>/L<k>/seg-….arrows   per-filter series of one layer at pyramid level k (buckets of 10**k records)
    snapshots/snapshot-<step>-<seq>.safetensors

Every ``.arrows`` file is an Arrow IPC *stream*: a schema message followed by record batches, each one
self-delimiting (continuation marker, metadata length, metadata, body whose length is in the metadata). The writer
only appends; a segment that was being written when the process died ends in a truncated message, which
``read_segment`` detects (pyarrow refuses to read past the bytes that exist) and drops. Files are never rewritten.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa

FORMAT_NAME = "revacnn-recording"
FORMAT_VERSION = 1
MARKER = "run.json"
SEGMENT_SUFFIX = ".arrows"
LEVEL_FACTOR = 10          # a level-k bucket aggregates 10**k per-filter records
TERMINAL_STATES = ("finished", "stopped", "failed")
# Every record batch ends with this int64 column, one value per row. Arrow lays a batch's buffers out in column
# order, so this is the last thing in the batch body: a body whose tail is missing or zero-filled (a torn write
# after a machine crash) fails the check instead of being read as data.
COMMIT_COLUMN = "_commit"
COMMIT_MAGIC = 0x52455641434E4E31   # "REVACNN1"

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def quote_layer(name: str) -> str:
    """A layer name as a directory name: every character outside [A-Za-z0-9._-] becomes %XX (UTF-8)."""
    out = []
    for char in name:
        if _SAFE.match(char) or char == "%":
            out.extend(f"%{byte:02X}" for byte in char.encode())
        else:
            out.append(char)
    text = "".join(out)
    return text if text not in ("", ".", "..") else "%" + text.encode().hex()


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


def read_segment(path: Path) -> tuple[pa.Schema | None, list[pa.RecordBatch], bool]:
    """The complete record batches of one segment, the schema, and False when a truncated tail was dropped.

    A truncated tail (crash, or a writer still appending) is detected and ignored: pyarrow reads each message's
    length first and raises when fewer bytes exist, so a partial batch is never returned. A missing or empty file
    gives ``(None, [], False)``.
    """
    try:
        source = pa.memory_map(str(path), "r")
    except (FileNotFoundError, OSError):
        return None, [], False
    # The batches returned point into the memory map, which stays alive as long as they do.
    try:
        reader = pa.ipc.open_stream(source)
    except (pa.ArrowException, OSError, ValueError):
        return None, [], False
    schema = reader.schema
    commit = schema.get_field_index(COMMIT_COLUMN)
    if commit >= 0:
        schema = schema.remove(commit)
    batches: list[pa.RecordBatch] = []
    clean = True
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError):
            clean = False
            break
        if commit >= 0:
            marks = batch.column(commit).to_numpy(zero_copy_only=False)
            if batch.column(commit).null_count or not (marks == COMMIT_MAGIC).all():
                clean = False
                break
            batch = batch.remove_column(commit)
        batches.append(batch)
    return schema, batches, clean
