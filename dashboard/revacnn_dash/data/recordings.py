"""The recorded runs the analysis views read (snapshot comparison, training-log explorer): found under some
directories, their readers and derived results cached, and followed while they are still being recorded."""

from __future__ import annotations

import threading
import time

from pathlib import Path
from typing import Any

from revacnn.recording.reader import list_runs, open_run

from ..compute.cache import LRUCache

LIVE_REFRESH_S = 5.0    # a page follows a run still being recorded at most this often (its views re-read the log)


class RunSource:
    """Recorded runs under some directories (searched with ``list_runs``) and/or given run directories; readers
    and comparisons are cached."""

    def __init__(self, paths) -> None:
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self._readers: dict[str, Any] = {}
        self._cache = LRUCache(16)
        self._lock = threading.Lock()

    def runs(self) -> list[dict]:
        out, seen = [], set()
        for path in self.paths:
            found = [{"path": str(path), "run_id": path.name}] if (path / "run.json").exists() else list_runs(path)
            for run in found:
                if run["path"] not in seen:
                    seen.add(run["path"])
                    out.append(run)
        return out

    def options(self) -> list[dict]:
        return [{"label": f"{Path(r['path']).parent.name}/{r.get('run_id', '')}", "value": r["path"]}
                for r in self.runs()]

    def reader(self, path: str):
        with self._lock:
            if path not in self._readers:
                self._readers[path] = open_run(path)
            return self._readers[path]

    def version(self, path: str) -> float:
        """Changes when the run directory got new data (a live run): part of the cache keys of derived views."""
        try:
            return self.reader(path).last_write()
        except OSError:
            return 0.0

    def cached(self, key, make):
        missing = object()
        with self._lock:
            value = self._cache.get(key, missing)
        if value is missing:
            value = make()
            with self._lock:
                self._cache.put(key, value)
        return value

    def follow(self, runs: list[str | None], live: dict | None) -> dict | None:
        """A new ``*-live`` marker when a shown run's directory got data since the last one, at most every
        ``LIVE_REFRESH_S``; None when the views are up to date."""
        now = time.time()
        if live and now - live["at"] < LIVE_REFRESH_S:
            return None
        versions = [self.version(run) if run else None for run in runs]
        if live and versions == live["versions"]:
            return None
        return {"versions": versions, "at": now}
