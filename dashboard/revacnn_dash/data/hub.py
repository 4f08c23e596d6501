"""The runs the dashboard shows: live ones (each with its I/O thread) and recorded ones from a log directory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from ..compute.embedding_service import EmbeddingService
from .replay import load_replay
from .state import REPLAY, RunState, run_name
from .worker import RunWorker


class Hub:
    def __init__(self, targets: list[str] = (), logdir: str | None = None, warm_umap: bool = True,
                 silence_s: float = 5.0, client_options: dict[str, Any] | None = None) -> None:
        # RunClient's CURVE options for every live run: client_keys, server_key, host (docs/remote.md).
        self.client_options = {k: v for k, v in (client_options or {}).items() if v is not None}
        if self.client_options.get("client_keys") is not None:
            from revacnn.wire.connection import load_keypair

            load_keypair(self.client_options["client_keys"])   # a bad key file fails at start, not per run
        self.runs: dict[str, RunState] = {}
        self.workers: dict[str, RunWorker] = {}
        self.replays: dict[str, Any] = {}         # key → RunReader
        self.logdir = logdir
        self.scan_every_s = 5.0
        self._scanned: tuple[str | None, float] = (None, 0.0)
        self.lock = threading.Lock()
        self.embeddings = EmbeddingService()
        if warm_umap:
            self.embeddings.warm_umap()
        for target in targets:
            self.add_live(target, silence_s=silence_s)

    def add_live(self, target: str, silence_s: float = 5.0) -> RunState:
        state = RunState(str(target))
        worker = RunWorker(state, silence_s=silence_s, client_options=self.client_options, logdir=self.logdir)
        with self.lock:
            self.runs[state.key] = state
            self.workers[state.key] = worker
        worker.start()
        return state

    def recording_dirs(self) -> list[Path]:
        """Where recordings are: ``--logdir`` and the local directories of the live runs (their run directories)."""
        dirs = [Path(self.logdir)] if self.logdir else []
        with self.lock:
            targets = [state.target for state in self.runs.values()]
        for target in targets:
            path = Path(target)
            if not str(target).startswith("tcp://") and path.exists():
                dirs.append(path.parent if path.is_file() else path)
        return dirs

    def get(self, key: str | None) -> RunState | None:
        with self.lock:
            if key in self.runs:
                return self.runs[key]
            return next(iter(self.runs.values()), None) if key is None else None

    def options(self) -> list[dict[str, str]]:
        self.scan_logdir()
        with self.lock:
            states = list(self.runs.values())
        out = []
        for s in states:
            prefix = "● live" if s.source == "live" else "◼ recorded"
            name = run_name(s.run_id or s.label, s.structure)
            out.append({"label": f"{prefix}: {name} ({s.conn})" if s.source == "live" else f"{prefix}: {name}",
                        "value": s.key})
        return out

    def scan_logdir(self) -> None:
        """Add recorded runs found below ``logdir`` (at most every ``scan_every_s``; the header polls each tick)."""
        if not self.logdir:
            return
        now = time.monotonic()
        if self._scanned[0] == self.logdir and now - self._scanned[1] < self.scan_every_s:
            return
        self._scanned = (self.logdir, now)
        try:
            from revacnn.recording.reader import list_runs, open_run
        except ImportError:      # the reader needs pyarrow; without it there is no replay
            return
        for info in list_runs(self.logdir):
            path = info["path"]
            state = RunState(path, label=info.get("run_id") or Path(path).name, source="replay")
            with self.lock:
                if state.key in self.runs:
                    known, reader = self.runs[state.key], self.replays.get(state.key)
                    if reader is not None and not info.get("finished"):   # a run still recorded: its new snapshots
                        known.replay_steps = reader.snapshot_steps()     # join the step menu
                    continue
                self.runs[state.key] = state
            try:
                reader = open_run(path)
                self.replays[state.key] = reader
                load_replay(state, reader)
            except Exception as error:   # a damaged recording must not take the page down
                state.set_connection(REPLAY, f"cannot read {path}: {type(error).__name__}: {error}")

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stopping.set()
        for worker in self.workers.values():
            worker.join(3)
        self.embeddings.shutdown()
