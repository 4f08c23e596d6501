"""The per-filter level pyramid read back (``RunReader.filter_series``). No torch.

A layer's series is stored at several levels (format.py): level 0 holds every record still kept, level k buckets of
10**k records. Reading picks, per part of the run, the finest level on disk (``merge_levels``), or the finest level
whose rows fit a requested resolution, and assembles one ``[T, F]`` array with one column per filter id.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from .format import quote_layer
from .segment_cache import SegmentCache
from .timeline import in_step_range, latest_timeline

_LEVEL_KEY = 1 << 32          # (level, segment) as one integer: level * _LEVEL_KEY + segment


class FilterSegment:
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



class PyramidSegments:
    """The segments of every layer's pyramid levels in one run directory, each level's cached (``SegmentCache``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._caches: dict[tuple[str, int], SegmentCache] = {}

    def segments(self, names: list[str], level: int) -> list[FilterSegment]:
        """One level's segments of a layer under each name it had (``RunReader.lineage``), in order: a recorder
        writes a renamed layer on under its first name, and one that resumed after the rename under the new one."""
        return [segment for name in names for _, segment in self._cache(name, level).read()]

    def levels(self, names: list[str], count: int) -> list[list[FilterSegment]]:
        """Every level's segments, read coarsest first and back to back: a bucket is written after the records it
        holds, so the finer levels, read last, are at least as new as the coarse ones and nothing falls between
        (read the other way round, records written in between showed up as buckets only). Empty coarsest levels
        are left out."""
        levels = [self.segments(names, level) for level in reversed(range(count))]
        levels.reverse()
        while levels and not levels[-1]:
            levels.pop()
        return levels

    def _cache(self, layer: str, level: int) -> SegmentCache:
        key = (layer, level)
        if key not in self._caches:
            self._caches[key] = SegmentCache(self.run_dir / "filters" / quote_layer(layer) / f"L{level}",
                                             FilterSegment)
        return self._caches[key]


def empty_series() -> dict[str, np.ndarray]:
    return {"step": np.zeros(0, np.int64), "filter_ids": np.zeros(0, np.int64), "values": np.zeros((0, 0), np.float32)}


def read_filter_series(levels: list[list[FilterSegment]], field: str, start: int | None, stop: int | None,
                       resolution: int | None) -> dict[str, np.ndarray]:
    """``field`` of one layer from its pyramid ``levels`` (``PyramidSegments.levels``); the returned dict:
    ``RunReader.filter_series``."""
    if not levels:
        return empty_series()
    rows = _level_rows(levels)
    picked = _in_step_order(rows, _select(rows, start, stop, resolution))
    if picked is None:
        return empty_series()
    steps, row_level, row_seg, row_in_seg = picked
    downsampled = bool(np.any(row_level > 0))
    key = row_level * _LEVEL_KEY + row_seg
    groups = _groups_in_order(key, row_level, row_seg)
    ids = _filter_columns(levels, groups)
    n, width = len(steps), len(ids)
    # every cell is written unless some segment lacks some filter ids (steering): then start from NaN
    covered = all(len(levels[k][s].ids) == width for k, s in groups)
    blank = np.empty if covered else (lambda shape, dtype: np.full(shape, np.nan, dtype))
    values = blank((n, width), np.float32)
    low = blank((n, width), np.float32) if downsampled else None
    high = blank((n, width), np.float32) if downsampled else None
    ends = np.empty(n, np.int64)
    counts = np.empty(n, np.int64)
    for k, s in groups:
        out_rows = np.nonzero(key == k * _LEVEL_KEY + s)[0]
        seg_rows = row_in_seg[out_rows]
        segment = levels[k][s]
        blocks = _Blocks(out_rows, seg_rows, np.asarray([ids[int(fid)] for fid in segment.ids], np.int64), n, width)
        blocks.put(values, segment, field)
        if downsampled:
            blocks.put(low, segment, field if k == 0 else field + "/min")
            blocks.put(high, segment, field if k == 0 else field + "/max")
        ends[out_rows] = segment.ends[seg_rows]
        counts[out_rows] = segment.counts[seg_rows]
    out = {"step": steps, "filter_ids": np.fromiter(ids, np.int64, width), "values": values}
    if resolution is not None and n > resolution:
        return rebucket(out, low, high, ends, counts, resolution)
    if downsampled:
        out.update({"min": low, "max": high, "step_end": ends, "count": counts})
    return out


def _level_rows(levels: list[list[FilterSegment]]) -> list[tuple[np.ndarray, ...]]:
    """Per level: (first step, last step, segment index, row index in its segment) of every row; level 0's rows
    (single records) only where the latest timeline has them."""
    rows = []
    for segments in levels:
        if segments:
            starts = np.concatenate([s.starts for s in segments])
            ends = np.concatenate([s.ends for s in segments])
            seg = np.concatenate([np.full(len(s.starts), i) for i, s in enumerate(segments)])
            row = np.concatenate([np.arange(len(s.starts)) for s in segments])
        else:
            starts = ends = seg = row = np.zeros(0, np.int64)
        rows.append((starts, ends, seg, row))
    rows[0] = tuple(column[latest_timeline(rows[0][0])] for column in rows[0])
    return rows


def _select(rows, start: int | None, stop: int | None, resolution: int | None) -> dict[int, np.ndarray]:
    """Per level, which of its rows to return: the cover of the run (``merge_levels``) based on the finest level
    whose cover has at most ``resolution`` rows in the step range, or on the coarsest level."""
    for level in range(len(rows)):
        selection = {k: mask & in_step_range(rows[k][0], start, stop, rows[k][1])
                     for k, mask in merge_levels(rows, level).items()}
        count = sum(int(np.count_nonzero(mask)) for mask in selection.values())
        if resolution is None or count <= resolution or level == len(rows) - 1:
            return selection
    raise AssertionError("unreachable: the coarsest level is always taken")


def _in_step_order(rows, selection: dict[int, np.ndarray]):
    """The selected rows' (step, level, segment index, row in segment), sorted by step; None if there are none."""
    parts = [(rows[k][0][mask], np.full(int(mask.sum()), k), rows[k][2][mask], rows[k][3][mask])
             for k, mask in selection.items() if mask.any()]
    if not parts:
        return None
    steps, row_level, row_seg, row_in_seg = (np.concatenate(column) for column in zip(*parts))
    order = np.argsort(steps, kind="stable")
    return steps[order], row_level[order], row_seg[order], row_in_seg[order]


def _groups_in_order(key: np.ndarray, row_level: np.ndarray, row_seg: np.ndarray) -> list[tuple[int, int]]:
    """The (level, segment) groups of the rows, in order of first appearance."""
    _, first_index = np.unique(key, return_index=True)
    return [(int(row_level[i]), int(row_seg[i])) for i in sorted(first_index)]


def _filter_columns(levels: list[list[FilterSegment]], groups: list[tuple[int, int]]) -> dict[int, int]:
    """Filter id → output column, in order of first appearance across the groups."""
    ids: dict[int, int] = {}
    for k, s in groups:
        for fid in levels[k][s].ids.tolist():
            if fid not in ids:
                ids[fid] = len(ids)
    return ids


class _Blocks:
    """Where one segment's rows go in the output: its output rows, its own rows and the columns of its filter ids,
    each as a slice where it is a contiguous run (assigned as a block, not element by element)."""

    def __init__(self, out_rows: np.ndarray, seg_rows: np.ndarray, cols: np.ndarray, n: int, width: int) -> None:
        contiguous = len(cols) and cols[-1] - cols[0] + 1 == len(cols) and np.all(np.diff(cols) == 1)
        self.cols = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
        self.rows = _as_slice(out_rows)
        self.seg_rows = _as_slice(seg_rows)
        self.n, self.width = n, width

    def put(self, target: np.ndarray, segment: FilterSegment, column: str) -> None:
        """Copy ``column`` of the segment's rows into ``target``."""
        rows, cols, seg_rows = self.rows, self.cols, self.seg_rows
        if isinstance(rows, slice) and isinstance(cols, slice) and isinstance(seg_rows, slice):
            first, last = seg_rows.start, seg_rows.stop      # copy straight from each batch
            for offset, part in segment.parts(column):
                lo, hi = max(first, offset), min(last, offset + len(part))
                if lo < hi:
                    out = rows.start + lo - first
                    target[out:out + hi - lo, cols] = part[lo - offset:hi - offset]
            return
        data = segment.column(column)[seg_rows]
        if isinstance(rows, slice) and isinstance(cols, slice):
            target[rows, cols] = data
        else:
            target[np.ix_(np.arange(self.n)[rows], np.arange(self.width)[cols])] = data


def _as_slice(index: np.ndarray):
    """``index`` as a slice where its first and last entries span exactly its length (for ascending rows: a
    contiguous run), else itself."""
    return slice(int(index[0]), int(index[-1]) + 1) if index[-1] - index[0] + 1 == len(index) else index


def merge_levels(rows, level: int) -> dict[int, np.ndarray]:
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


def rebucket(out, low, high, ends, counts, resolution: int) -> dict[str, np.ndarray]:
    """At most ``resolution`` rows: consecutive rows merged into buckets (count-weighted mean, min, max)."""
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
