"""The run directory's disk budget: how much it may hold, what is dropped when it would hold more, and the record
of what was dropped. No torch. Runs on the recorder's thread only.

The limit at any moment is ``min(disk_budget, bytes the run holds + free space − min_free)``: the budget, and never
closer to a full disk than ``min_free``. When writing something would pass it, the ``DiskKeeper`` drops, in order:

1. older snapshots, in ``retention.drop_order``: those outside the policy's retained set first (a resumed run's
   abandoned branch before all), then the retained ones; never the newest, unless a newer one replaces it;
2. coarser per-filter data: the pyramid's levels keep fewer rows (one halving at a time, level 0 first) — for a
   snapshot only while the pyramid holds more than its share of the limit;
3. and if that is still not enough, what was to be written: the per-filter data of the steps concerned, or the
   snapshot. Scalars, events and validation rows are always written (they are small).

Besides, once the per-filter pyramid holds more than ``FILTER_SHARE`` of the budget, its levels are sized so that
it stays within that share at any run length (``pyramid_keeps``). Everything dropped is listed in run.json's ``dropped`` (``DiskKeeper.dropped``), and
``disk`` there and in the status heartbeat says how full the budget is. Policy: docs/design.md, "Recording".
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .retention import SnapshotKeep, check_policy, drop_order, retained

DEFAULT_BUDGET = "1GB"
DEFAULT_MIN_FREE = "1GB"
FILTER_SHARE = 0.5        # of the budget, the most the per-filter pyramid is sized to hold
WALK_EVERY = 5.0          # seconds between walks of the run directory while far from its limit (``DiskKeeper.refresh``)
MIN_KEEP = 20             # rows a pyramid level keeps at least: two buckets of the next level (LEVEL_FACTOR = 10)
SNAPSHOT_DTYPES = ("float32", "float16", "bfloat16")
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(value, name: str = "size") -> int | None:
    """A size in bytes from an int, a float or a string such as ``"1GB"``, ``"500 MB"``, ``"1.5GiB"`` (kB, MB, GB, TB
    are powers of 1000; KiB, MiB, GiB, TiB of 1024); None stays None (no limit)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"{name} must be a size in bytes (e.g. 1000000000 or '1GB'), or None; got {value!r}")


def disk_options(disk_budget, disk_min_free, snapshot_keep: SnapshotKeep, snapshot_dtype: str) -> dict[str, Any]:
    """The recorder's disk arguments, checked (ValueError): ``{"budget", "min_free", "snapshot_keep",
    "snapshot_dtype"}``. Importing this loads no pyarrow, so the callback checks them when it is made."""
    if snapshot_dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"snapshot_dtype must be one of {SNAPSHOT_DTYPES}, got {snapshot_dtype!r}")
    return {"budget": parse_bytes(disk_budget, "disk_budget"),
            "min_free": parse_bytes(disk_min_free, "disk_min_free") or 0,
            "snapshot_keep": check_policy(snapshot_keep), "snapshot_dtype": snapshot_dtype}


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (apparent sizes; links not followed)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += dir_bytes(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:        # retired while we looked
            continue
    return total


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (for unprivileged users)."""
    return shutil.disk_usage(path).free


def segment_rows(keep: int, cap: int | None = None) -> int:
    """Rows per segment of a pyramid level that keeps ``keep`` rows: old rows are deleted a whole segment at a time,
    so a level holds at most ``keep`` + one segment. At least 50 rows (fewer, larger batches read faster), but at most
    ``cap`` (≥ 10) under a disk budget (``segment_cap``)."""
    rows = max(50, keep // 4)
    return rows if cap is None else max(10, min(rows, cap))


def segment_cap(record_bytes: int, budget: int | None) -> int | None:
    """Under a budget, the most rows a pyramid segment holds: the open segments of all layers' level 0 together at
    most an eighth of the pyramid's share, so that what a smaller keep frees (whole segments, once old) follows it
    closely."""
    if budget is None or record_bytes <= 0:
        return None
    return max(10, int(FILTER_SHARE * budget / 8 / record_bytes))


def _fitting_keep(rows: float) -> int:
    """The largest budgeted ``keep`` whose level holds at most ``rows`` rows (``keep`` + one segment)."""
    return int(rows / 1.25) if rows >= 50 else int(rows - 10)


def pyramid_keeps(record_bytes: int, share: int | None, levels: int, maxima: tuple[int, ...]) -> tuple[int, ...]:
    """Rows each pyramid level keeps so that the whole pyramid stays within ``share`` bytes: level 0 (one row per
    record, ``record_bytes``) gets half of it, each bucket level below the coarsest (rows of mean, min and max: three
    times as large) an equal part of the other half; each at most its ``maxima`` entry and at least ``MIN_KEEP``.
    The coarsest level keeps everything (one row per 10**(levels−1) records)."""
    if share is None or record_bytes <= 0:
        return maxima
    bucket_levels = max(levels - 2, 0)
    level0_share = share if bucket_levels == 0 else share / 2
    keeps = [min(maxima[0], max(MIN_KEEP, _fitting_keep(level0_share / record_bytes)))]
    for k in range(1, levels):
        if k == levels - 1:
            keeps.append(maxima[k])
        else:
            part = share / 2 / bucket_levels
            keeps.append(min(maxima[k], max(MIN_KEEP, _fitting_keep(part / (3 * record_bytes)))))
    return tuple(keeps)


class DiskKeeper:
    """Keeps one run directory within its limit (module docstring). ``maxima``: the rows each pyramid level was
    asked to keep; ``set_keeps``: the writer's, gives every layer's pyramid new keeps (and retires what they drop)."""

    def __init__(self, run_dir: Path, budget: int | None, min_free: int, snapshot_keep: SnapshotKeep,
                 maxima: tuple[int, ...], set_keeps: Callable[[tuple[int, ...]], None]) -> None:
        self.run_dir = run_dir
        self.budget = budget
        self.min_free = min_free
        self.snapshot_keep = snapshot_keep
        self.maxima = maxima
        self.keeps = maxima
        self._set_keeps = set_keeps
        self._planned_for = 0                  # the record size the keeps were planned for
        self.used = 0
        self.pyramid = 0                            # of which the per-filter pyramid (filters/)
        self.free = 0
        self.limit = budget
        self.reason = "budget"
        self.filters_blocked: str | None = None     # why per-filter data is not being written, or None
        self.snapshots: list[list] = []             # [step, seq, path, bytes, on the latest timeline]
        self.dropped: dict[str, list[dict[str, Any]]] = {"snapshots": [], "snapshots_not_written": [],
                                                         "filter_levels": [], "filter_steps": []}
        self.changed = False                        # something was dropped since run.json was last written
        self.step: int | None = None                # the latest step seen (for the record)
        self._walked_at = -math.inf                 # when ``used`` was last measured by walking the directory

    # -- measuring --------------------------------------------------------------------------------------------
    def track_existing_snapshots(self, files: list[tuple[int, int, Path, bool]]) -> None:
        for step, seq, path, latest in files:
            try:
                self.snapshots.append([step, seq, path, path.stat().st_size, latest])
            except FileNotFoundError:
                continue

    def refresh(self, need: int) -> None:
        """Before a write-out of at most ``need`` bytes: the free space and so the limit, and the run directory's
        size walked again when the last walk is ``WALK_EVERY`` seconds old or ``need`` might not fit. Otherwise
        ``used`` is the last walk's figure plus each write-out since, counted at the bound it was planned with
        (``wrote``; deletions are not subtracted until the next walk). Nothing is dropped without a fresh walk. A walk
        of a ResNet-50 run's few hundred files took ~6 ms, which every 0.5 s was most of what the recorder's thread
        spent on per-step scalars."""
        if time.monotonic() - self._walked_at >= WALK_EVERY or self.used + need > self.limit:
            self.measure()
        else:
            self._measure_free()

    def wrote(self, written: int, pyramid: int) -> None:
        """A write-out wrote at most ``written`` bytes, ``pyramid`` of them per-filter data."""
        self.used += written
        self.pyramid += pyramid

    def measure(self) -> None:
        """Re-measure the run directory (and its pyramid) and the free space, and so the limit."""
        self._walked_at = time.monotonic()
        self.used = self.pyramid = 0
        try:
            entries = list(os.scandir(self.run_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                size = dir_bytes(Path(entry.path)) if is_dir else entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            self.used += size
            if entry.name == "filters":
                self.pyramid = size
        self._measure_free()

    def _measure_free(self) -> None:
        try:
            self.free = free_bytes(self.run_dir)
        except OSError:
            self.free = 0
        room = self.used + self.free - self.min_free
        if self.budget is None or room < self.budget:
            self.limit, self.reason = room, "free space"
        else:
            self.limit, self.reason = self.budget, "budget"

    def plan_pyramid(self, record_bytes: int) -> None:
        """Once the pyramid holds more than its share of the budget, size its levels for records of
        ``record_bytes`` (again when that changes by more than 10 %); until then each keeps what it was asked to."""
        if self.budget is None or record_bytes <= 0:
            return
        share = int(FILTER_SHARE * self.budget)
        planned = self._planned_for
        if (not planned and self.pyramid <= share) or (planned and abs(record_bytes - planned) <= 0.1 * planned):
            return
        self._planned_for = record_bytes
        self._apply_keeps(pyramid_keeps(record_bytes, share, len(self.maxima), self.maxima), "budget plan")

    def _apply_keeps(self, keeps: tuple[int, ...], reason: str) -> None:
        if keeps == self.keeps:
            return
        for level, (old, new) in enumerate(zip(self.keeps, keeps)):
            if new < old:
                self._log("filter_levels", {"level": level, "keep": new, "was": old, "reason": reason})
        self.keeps = keeps
        self._set_keeps(keeps)

    # -- making room ------------------------------------------------------------------------------------------
    def make_room(self, need: int, for_snapshot: bool) -> bool:
        """Drop what the order allows until ``need`` more bytes fit under the limit; False if they still do not."""
        if self.used + need <= self.limit:
            return True
        victims = self._snapshot_victims(for_snapshot)
        if for_snapshot:        # one that cannot fit even then: keep what is there
            spare_pyramid = max(0.0, self.pyramid - FILTER_SHARE * self.limit)
            if self.used - sum(victim[3] for victim in victims) - spare_pyramid + need > self.limit:
                return False
        for victim in victims:
            self._delete_snapshot(victim)
            if self.used + need <= self.limit:
                return True
        # one halving per write-out at most: what it frees (old segments) goes only as newer rows come, so halving
        # again at once would coarsen far past what is needed
        if for_snapshot and self.pyramid <= FILTER_SHARE * self.limit:
            return False              # a snapshot does not take the pyramid's share
        if self._coarsen():
            self.measure()
        return self.used + need <= self.limit

    def _snapshot_victims(self, for_snapshot: bool) -> list[list]:
        """Snapshot entries in the order they go: abandoned ones (not on the latest timeline), then by
        ``drop_order``: outside the retained set first. A new snapshot replaces the newest, which then may go too."""
        abandoned = [entry for entry in self.snapshots if not entry[4]]
        live = [entry for entry in self.snapshots if entry[4]]
        steps = [entry[0] for entry in live]
        if for_snapshot and steps:
            steps.append(max(steps) + 1)              # stands for the snapshot to be written
        by_step = {entry[0]: entry for entry in live}
        return abandoned + [by_step[step] for step in drop_order(steps, retained(steps, self.snapshot_keep))
                            if step in by_step]

    def _coarsen(self) -> bool:
        """One halving of the pyramid's keeps: level 0 first, then the bucket levels; False at the minimum."""
        keeps = list(self.keeps)
        for level in range(max(len(keeps) - 1, 1)):
            if keeps[level] > MIN_KEEP:
                keeps[level] = max(MIN_KEEP, keeps[level] // 2)
                self._apply_keeps(tuple(keeps), self.reason)
                return True
        return False

    def _delete_snapshot(self, entry: list, reason: str | None = None) -> None:
        step, seq, path, size, _ = entry
        try:
            os.unlink(path)
        except FileNotFoundError:
            size = 0
        self.snapshots.remove(entry)
        self.used -= size
        self._log("snapshots", {"step": step, "seq": seq, "bytes": size, "reason": reason or self.reason})

    # -- after writing ----------------------------------------------------------------------------------------
    def add_snapshot(self, step: int, seq: int, path: Path, size: int) -> None:
        """A snapshot was written: track it, and apply a user policy (what it does not keep is deleted)."""
        for entry in self.snapshots:                  # a resumed run's snapshot supersedes those at or after it
            if entry[0] >= step:
                entry[4] = False
        self.snapshots.append([step, seq, path, size, True])
        self.used += size
        if self.snapshot_keep is not None:
            live = [entry for entry in self.snapshots if entry[4]]
            kept = retained([entry[0] for entry in live], self.snapshot_keep)
            for entry in live:
                if entry[0] not in kept:
                    self._delete_snapshot(entry, "snapshot_keep")

    def snapshot_not_written(self, step: int, reason: str) -> None:
        self._log("snapshots_not_written", {"step": step, "reason": reason})

    def filter_steps_dropped(self, steps: list[int], reason: str) -> None:
        """Per-filter data of ``steps`` was not written: extend the last entry when it is the same run of steps."""
        if not steps:
            return
        log = self.dropped["filter_steps"]
        last = log[-1] if log else None
        if last is not None and last["reason"] == reason and last["last"] <= min(steps):
            last["last"] = max(steps)
            last["count"] += len(steps)
            self.changed = True
        else:
            self._log("filter_steps", {"first": min(steps), "last": max(steps), "count": len(steps),
                                       "reason": reason})

    def _log(self, kind: str, entry: dict[str, Any]) -> None:
        entry.setdefault("at_step", self.step)
        entry["time"] = time.time()
        self.dropped[kind].append(entry)
        self.changed = True

    def status(self) -> dict[str, Any]:
        """The short summary carried by run.json's ``disk`` and the status heartbeat's ``disk``."""
        return {"used": int(self.used), "limit": int(max(self.limit, 0)), "budget": self.budget,
                "free": int(self.free), "min_free": self.min_free, "limited_by": self.reason,
                "filter_keep": list(self.keeps), "snapshots": len(self.snapshots),
                "dropped": {kind: len(entries) if kind != "filter_steps" else sum(e["count"] for e in entries)
                            for kind, entries in self.dropped.items()},
                "filters_blocked": self.filters_blocked}
