"""``RunWriter``: turns messages into the files of a run directory, one message at a time. No torch.

It keeps what the rows need between messages (the latest structure's filter ids per revision, the first name of a
renamed layer, the scalar columns seen so far), collects rows until ``write_out`` appends them as record batches, and
hands per-filter data to each layer's ``LayerSeries``. It raises on errors; ``RunRecorder`` (writer.py) runs it on
its background thread and decides what an error stops. Layout: format.py.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..wire.protocol import FILTER_FIELDS, Message
from .format import FORMAT_NAME, FORMAT_VERSION, LEVEL_FACTOR, MARKER, to_json, write_json_atomic
from .budget import DiskKeeper, segment_cap
from .lineage import renamed_by
from .pyramid import LayerSeries
from .rows import events_batch, layers_batches, scalar_row, scalars_batch, val_batch
from .snapshots import all_snapshot_files, estimate_bytes, write_snapshot
from .stream import SegmentStream

log = logging.getLogger(__name__)

STREAM_ROWS = 50000     # rows per segment of the events, scalars, layers and val streams
INFO_EVERY = 10.0       # seconds between run.json updates of the disk figures (at once when something is dropped)


class RunWriter:
    """Writes one run directory (created, with its ``run.json``); see the module docstring."""

    def __init__(self, run_dir: Path, float16_filters: bool, levels: int, keep: tuple[int, ...],
                 status_every: float, disk: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.float16_filters = float16_filters
        self.levels = levels
        self.keep = keep
        self.snapshot_dtype = disk["snapshot_dtype"]
        self.segment_cap: int | None = None     # rows per pyramid segment at most (budget.segment_cap)
        self.status_every = status_every
        self.series: dict[str, LayerSeries] = {}
        self.streams: dict[str, SegmentStream] = {}
        self._structure: dict | None = None
        self._layer_ids: dict[str, np.ndarray] = {}
        self._ids_by_revision: dict[int, dict[str, np.ndarray]] = {}
        self._first_name: dict[str, str] = {}          # a layer renamed by steering -> the name its series has
        self._pending: dict[str, list] = {"events": [], "scalars": [], "layers": [], "val": []}
        self._scalar_columns: dict[str, None] = {}     # an ordered set: columns in order of appearance
        self._last_status: tuple[str | None, float] = (None, -math.inf)
        self._mismatch_warned = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._inode = os.stat(self.run_dir).st_ino
        self.keeper = DiskKeeper(self.run_dir, disk["budget"], disk["min_free"], disk["snapshot_keep"], keep,
                                 self._set_keeps)
        self.keeper.track_existing_snapshots(all_snapshot_files(self.run_dir))
        self.keeper.measure()
        self._info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "run_id": None, "name": None, "created": time.time(),
                      "pid": os.getpid(), "host": socket.gethostname(), "float16_filters": float16_filters,
                      "full_records": keep[0], "keep_buckets": keep[1] if levels > 1 else None,
                      "levels": levels, "level_factor": LEVEL_FACTOR, "snapshot_dtype": self.snapshot_dtype,
                      "snapshot_keep": _policy_text(disk["snapshot_keep"]), "closed": None}
        self._info_written = -math.inf
        self._write_info()
        for name in self._pending:
            self.streams[name] = SegmentStream(self.run_dir / name, STREAM_ROWS)

    @property
    def pending_bytes(self) -> int:
        """Per-filter data waiting for ``write_out``."""
        return sum(series.pending_bytes for series in self.series.values())

    def _write_info(self) -> None:
        """run.json, with the disk figures and what was dropped (replaced atomically)."""
        self._info["disk"] = self.keeper.status()
        self._info["dropped"] = self.keeper.dropped
        write_json_atomic(self.run_dir / MARKER, self._info)
        self.keeper.changed = False
        self._info_written = time.monotonic()

    # -- one message ------------------------------------------------------------------------------------------
    def handle(self, message: Message, arrays_dropped: bool = False) -> None:
        """Record ``message``; ``arrays_dropped``: its buffers were left behind (the recorder's inbox was full of
        bytes), so only its body is recorded, and what that lost is listed in run.json."""
        kind, body = message.type, message.body
        if isinstance(body.get("step"), int):
            self.keeper.step = body["step"]
        if arrays_dropped and kind == "step" and body.get("per_filter"):
            self.keeper.filter_steps_dropped([body.get("step")], "backlog")
        if message.run and self._info.get("run_id") is None:
            self._info["run_id"] = message.run
            write_json_atomic(self.run_dir / MARKER, self._info)
        if kind == "step":
            self._handle_step(message)
        elif kind == "steps":
            drops = message.body.get("drops")
            for body in message.body.get("rows") or []:
                self._pending["scalars"].append(scalar_row(body, message.time, message.seq, drops))
        elif kind == "structure":
            self._follow_structure(body)
            self._event(message)
        elif kind == "snapshot":
            self._snapshot(message, arrays_dropped)
            self._event(message)
        elif kind == "val":
            pred = message.arrays.get("pred")
            label = message.arrays.get("label")
            self._pending["val"].append((body.get("step"), body.get("epoch"), message.time, message.seq,
                                         to_json(body), pred, label))
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

    def _snapshot(self, message: Message, arrays_dropped: bool) -> None:
        """Write a snapshot where the disk budget makes room for it (budget.py); else list it as not written."""
        step = int(message.body.get("step") or 0)
        if arrays_dropped:
            self.keeper.snapshot_not_written(step, "backlog")
            return
        self.keeper.measure()
        if not self.keeper.make_room(estimate_bytes(message, self.snapshot_dtype), True):
            self.keeper.snapshot_not_written(step, self.keeper.reason)
            return
        path, size = write_snapshot(self.run_dir, message, self.snapshot_dtype)
        self.keeper.add_snapshot(step, int(message.seq), path, size)

    def _set_keeps(self, keeps: tuple[int, ...]) -> None:
        self.keep = keeps
        for series in self.series.values():
            series.set_keep(keeps, self.segment_cap)

    def _event(self, message: Message, step: Any = None) -> None:
        step = message.body.get("step") if step is None else step
        self._pending["events"].append((message.seq, message.time, message.type,
                                        step if isinstance(step, int) else None, to_json(message.body)))

    def _follow_structure(self, body: dict) -> None:
        self._structure = body
        if body.get("name") != self._info.get("name"):          # the user's run name, in run.json
            self._info["name"] = body.get("name")
            write_json_atomic(self.run_dir / MARKER, self._info)
        self._layer_ids = {}
        for layer in body.get("layers", []):
            ids = layer.get("filter_ids")
            if ids is None:
                ids = list(range(int(layer.get("out", 0))))
            self._layer_ids[layer["name"]] = np.asarray(ids, np.int64)
        if isinstance(body.get("revision"), int):
            self._ids_by_revision[body["revision"]] = self._layer_ids

    def _follow_renames(self, ack: dict) -> None:
        """A layer renamed by a command (insert_layer moves ``conv2`` into a Sequential as ``conv2.0``) keeps its
        filters and their ids: its per-filter series goes on in the directory of its first name, so the record and
        its buckets continue across the change (readers follow the renames in the acks)."""
        for old, new in renamed_by(ack).items():
            self._first_name[new] = self._first_name.get(old, old)

    def _handle_step(self, message: Message) -> None:
        body = message.body
        row = scalar_row(body, message.time, message.seq, body.get("drops"))
        names = body.get("layer_names")
        if names is None and self._structure is not None:
            names = [layer["name"] for layer in self._structure.get("layers", [])]
        filters = message.arrays.get("filters")
        if filters is not None and names and self.keeper.filters_blocked:
            self.keeper.filter_steps_dropped([body.get("step")], self.keeper.filters_blocked)
        elif filters is not None and names:
            self._add_filters(message, names, np.asarray(filters, np.float32))
        layers = message.arrays.get("layers")
        if layers is not None and names and len(layers) == len(names):
            self._pending["layers"].append((body.get("step"), message.time, tuple(names),
                                            np.asarray(layers, np.float32)))
        self._pending["scalars"].append(row)      # last: a message that raised above leaves no scalar row

    def _add_filters(self, message: Message, names: list[str], filters: np.ndarray) -> None:
        """Split a step's per-filter buffer ``[fields, Σ filters]`` into its layers' series."""
        body = message.body
        fields = tuple(body.get("filter_fields") or FILTER_FIELDS)
        # the structure revision the arrays are shaped by (protocol: body.revision); else the latest structure
        layer_ids = self._ids_by_revision.get(body.get("revision"), self._layer_ids)
        widths = [len(layer_ids.get(name, ())) for name in names]
        if filters.ndim != 2 or filters.shape[0] != len(fields) or sum(widths) != filters.shape[1] \
                or any(name not in layer_ids for name in names):
            if not self._mismatch_warned:
                self._mismatch_warned = True
                log.warning("revacnn recording: step %s per-filter buffer %s does not match the structure; "
                            "per-filter data of such steps is not recorded", body.get("step"), filters.shape)
            return
        start = 0
        for name, width in zip(names, widths):
            series = self._layer_series(self._first_name.get(name, name), fields)
            series.add(body.get("step"), message.time, layer_ids[name], filters[:, start:start + width].copy())
            start += width

    def _layer_series(self, name: str, fields: tuple[str, ...]) -> LayerSeries:
        """The series written under ``name``; a new one (the old one written out and closed) when the fields change."""
        series = self.series.get(name)
        if series is None or series.fields != fields:
            if series is not None:
                series.write()
                series.close()
            series = self.series[name] = LayerSeries(
                self.run_dir, name, fields, pa.float16() if self.float16_filters else pa.float32(),
                self.levels, self.keep, self.segment_cap)
        return series

    # -- to disk ----------------------------------------------------------------------------------------------
    def write_out(self) -> None:
        """Append everything collected since the last call; retire per-filter segments coarser levels cover."""
        self._check_run_dir()
        written, pyramid = self._keep_within_budget()
        for series in self.series.values():
            series.write()
        pending = self._pending
        for batch in layers_batches(pending["layers"]):
            self.streams["layers"].append(batch)
        if pending["scalars"]:
            self.streams["scalars"].append(scalars_batch(pending["scalars"], self._scalar_columns))
        if pending["val"]:
            self.streams["val"].append(val_batch(pending["val"]))
        if pending["events"]:
            self.streams["events"].append(events_batch(pending["events"]))
        for key in pending:
            pending[key] = []
        for series in self.series.values():
            series.retire()
        self.keeper.wrote(written, pyramid)
        if self.keeper.changed or time.monotonic() - self._info_written >= INFO_EVERY:
            self._write_info()

    def _keep_within_budget(self) -> tuple[int, int]:
        """Make room for what is about to be written (budget.py), or drop the per-filter part of it. While there is
        no room even for one more per-filter record, per-filter data is dropped as it arrives (``filters_blocked``).
        Returns the most the write-out will write, and the per-filter part of it."""
        keeper = self.keeper
        record = sum(series.record_bytes() for series in self.series.values())
        filters = max(self.pending_bytes, record if keeper.filters_blocked else 0)
        # n records complete at most n/10 + 1 level-1 buckets, n/100 + 1 level-2 ones, …, each row 3× a record (mean,
        # min, max): at most n/9 + levels − 1 bucket rows. Other rows are ~200 B each.
        pyramid = int(filters + 3 * (filters / 9 + record * (self.levels - 1)))
        need = pyramid + 200 * sum(len(rows) for rows in self._pending.values()) + (64 << 10)
        keeper.refresh(need)
        cap = segment_cap(record, keeper.budget)
        if cap != self.segment_cap:
            self.segment_cap = cap
            self._set_keeps(self.keep)
        keeper.plan_pyramid(record)
        if keeper.make_room(need, False):
            keeper.filters_blocked = None
            return need, pyramid
        keeper.filters_blocked = keeper.reason
        steps = sorted({step for series in self.series.values() for step in series.discard_pending()})
        keeper.filter_steps_dropped(steps, keeper.reason)
        return need - pyramid, 0

    def _check_run_dir(self) -> None:
        """Stop (raise) when the run directory was deleted or replaced: writing on would fill files nobody reads."""
        try:
            same = os.stat(self.run_dir).st_ino == self._inode
        except FileNotFoundError:
            same = False
        if not same:
            raise FileNotFoundError(f"run directory {self.run_dir} vanished")

    def finish(self) -> None:
        """Close every segment and mark the run closed in ``run.json``."""
        for series in self.series.values():
            series.close()
        for stream in self.streams.values():
            stream.close()
        self._info["closed"] = time.time()
        self.keeper.measure()
        self._write_info()

    def abandon(self) -> None:
        """After a write error: drop every file handle without writing anything more."""
        for series in self.series.values():
            series.abandon()
        for stream in self.streams.values():
            stream.abandon()


def _policy_text(keep) -> str | int | None:
    """``snapshot_keep`` as run.json states it: None, the count, or the callable's name."""
    if keep is None or isinstance(keep, int):
        return keep
    return getattr(keep, "__qualname__", None) or repr(keep)
