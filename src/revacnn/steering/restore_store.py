"""The bounded store of restore points: the most recent in host memory, older ones spilled to disk as safetensors by
a background thread (never in the training step), the oldest dropped once the caps are reached.

Caps (``RestorePolicy``): ``ram_points`` / ``ram_bytes`` for the points held in memory, ``max_points`` /
``disk_bytes`` for all of them. A point over the memory caps is handed to the spill thread; until its file is
written it stays in memory and can be restored from there. Without a spill directory, points over the memory caps
(or larger than ``disk_bytes``) are dropped instead, all but the newest.
"""

from __future__ import annotations

import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .restore import RestorePoint


@dataclass(frozen=True)
class RestorePolicy:
    """When restore points are taken and how many are kept.

    Args:
        every_steps: a periodic restore point every this many optimizer steps (0: none; points before commands are
            taken regardless). The default, 500, costs the demo CNN well under 1 % of its throughput
            (benchmarks/RESULTS.md) and is ~6 s of its training.
        ram_points, ram_bytes: the most points (and bytes of tensors) held in host memory. The default 64 MiB keeps
            the points of a small model in memory (fast to restore) and sends a large model's to disk as soon as they
            are taken, the newest one too: held in memory, a ResNet-50's points (180 MiB each with SGD momentum)
            would be most of the callback's memory (benchmarks/RESULTS.md, "Memory").
        max_points, disk_bytes: the most points kept in all, and bytes of spilled points on disk.
    """
    every_steps: int = 500
    ram_points: int = 4
    ram_bytes: int = 64 << 20
    max_points: int = 32
    disk_bytes: int = 8 << 30

    def __post_init__(self) -> None:
        for name in ("every_steps", "ram_points", "ram_bytes", "max_points", "disk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"RestorePolicy.{name} must be a non-negative integer, got {value!r}")
        if self.max_points < 1:
            raise ValueError("RestorePolicy.max_points must be ≥ 1")


class RestoreStore:
    """Restore points by id, oldest first; ``tensors(point)`` gives a point's tensors from memory or its file."""

    def __init__(self, policy: RestorePolicy, spill_dir: Path | None) -> None:
        self.policy = policy
        self.spill_dir = spill_dir
        self.points: dict[int, RestorePoint] = {}
        self.spill_errors: list[str] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[RestorePoint | None] = queue.Queue()
        self._spilling: set[int] = set()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------- the points
    def add(self, point: RestorePoint) -> None:
        with self._lock:
            self.points[point.id] = point
        self._enforce_caps()

    def discard(self, point_id: int) -> None:
        """Forget a point (one taken before a command that was then refused: nothing changed)."""
        with self._lock:
            point = self.points.pop(point_id, None)
        if point is not None and point.file:
            Path(point.file).unlink(missing_ok=True)

    def get(self, point_id: int) -> RestorePoint | None:
        return self.points.get(point_id)

    def tensors(self, point: RestorePoint) -> dict[str, torch.Tensor]:
        with self._lock:
            held = point.tensors
        if held is not None:
            return held
        from safetensors.torch import load_file

        return load_file(point.file)

    def ram_usage(self) -> tuple[int, int]:
        """(points, bytes) held in memory."""
        with self._lock:
            held = [p for p in self.points.values() if p.tensors is not None]
        return len(held), sum(p.nbytes for p in held)

    def disk_usage(self) -> tuple[int, int]:
        with self._lock:
            spilled = [p for p in self.points.values() if p.tensors is None]
        return len(spilled), sum(p.nbytes for p in spilled)

    # --------------------------------------------------------------------------------------------- the caps
    def _enforce_caps(self) -> None:
        policy = self.policy
        with self._lock:
            ordered = sorted(self.points.values(), key=lambda p: p.id)
            while len(ordered) > policy.max_points:
                self._drop(ordered.pop(0))
            in_ram = [p for p in ordered if p.tensors is not None and p.id not in self._spilling]
            count, nbytes = len(in_ram), sum(p.nbytes for p in in_ram)
            for point in in_ram:
                if count <= policy.ram_points and nbytes <= policy.ram_bytes:
                    break
                if point is ordered[-1] and count == 1 and (self.spill_dir is None
                                                            or point.nbytes > policy.disk_bytes):
                    break   # nowhere to write it: the newest point is kept in memory, whatever its size
                count, nbytes = count - 1, nbytes - point.nbytes
                if self.spill_dir is None or point.nbytes > policy.disk_bytes:
                    self._drop(point)
                    ordered.remove(point)
                else:
                    self._spilling.add(point.id)
                    self._queue.put(point)
                    self._start_thread()
            on_disk = [p for p in ordered if p.tensors is None]
            used = sum(p.nbytes for p in on_disk) + sum(self.points[i].nbytes for i in self._spilling
                                                         if i in self.points)
            for point in on_disk:
                if used <= policy.disk_bytes:
                    break
                used -= point.nbytes
                self._drop(point)

    def _drop(self, point: RestorePoint) -> None:
        """Forget ``point`` (the caller holds the lock)."""
        self.points.pop(point.id, None)
        if point.file:
            Path(point.file).unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------------- the spill thread
    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._spill_loop, name="revacnn-restore-spill", daemon=True)
            self._thread.start()

    def _spill_loop(self) -> None:
        from safetensors.torch import save_file

        while True:
            point = self._queue.get()
            if point is None:
                return
            path = self.spill_dir / f"restore-{point.id:06d}.safetensors"
            try:
                point.wait()   # a GPU point's host copies are complete (this thread waits, not training)
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                save_file(point.tensors, str(path))
            except Exception as exc:  # a full disk loses the old point, never the training
                self.spill_errors.append(f"restore point {point.id}: {type(exc).__name__}: {exc}")
                path.unlink(missing_ok=True)
                with self._lock:
                    self._spilling.discard(point.id)
                    self.points.pop(point.id, None)
                continue
            with self._lock:
                self._spilling.discard(point.id)
                if point.id in self.points:
                    point.file, point.tensors = str(path), None
                else:
                    path.unlink(missing_ok=True)   # dropped while it was written
            self._enforce_caps()

    def wait_spilled(self, timeout: float = 30.0) -> None:
        """Block until every point handed to the spill thread is written (tests and benchmarks)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._spilling:
                    return
            time.sleep(0.01)

    def close(self) -> None:
        """Stop the spill thread and delete the spilled files (restore points live as long as their run)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            self.points.clear()
        if self.spill_dir is not None and self.spill_dir.exists():
            shutil.rmtree(self.spill_dir, ignore_errors=True)
