"""A live run's history from before the dashboard heard it: the steps, validations and commands its recording holds,
merged into the run's state, so a page opened mid-run charts the run from its first step.

The wire only carries what is published after the dashboard subscribed (plus the latest batch of steps in the
state snapshot); the recorder writes every step, half a second behind. So after each (re)connection the I/O thread
reads the recording until it reaches the first step the wire brought (``RunState.first_live_step``), and merges it
in front (``RunState.merge_history``): no gap, no duplicate at the seam. Steps the wire dropped on the way are
filled from the recording as well.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from revacnn.wire.connection import CONNECTION_FILE_NAME

from .replay import recorded_columns, recorded_validations
from .state import RunState

#: How long after a connection the recording is read until it reaches the wire's first step, and how often.
FILL_WINDOW_S = 20.0
FILL_EVERY_S = 0.5


def find_recording(connection: str, run_id: str, logdir: str | None) -> Path | None:
    """The recording of run ``run_id`` on this machine: the run directory holding its connection file, else a run
    under ``logdir`` with that id; None when neither is here (a remote trainer without a shared log folder)."""
    candidates = []
    path = Path(connection)
    if not connection.startswith("tcp://") and path.exists():
        candidates.append(path.parent if path.is_file() else path)
    for directory in candidates:
        if _run_id(directory) == run_id:
            return directory
    if logdir:
        try:
            from revacnn.recording.reader import list_runs
        except ImportError:        # the reader needs pyarrow; without it there is no history to read
            return None
        for run in reversed(list_runs(logdir)):
            if run.get("run_id") == run_id:
                return Path(run["path"])
    return None


def _run_id(directory: Path) -> str | None:
    """The run recorded in ``directory``: its ``run.json`` names it once the first message is written, its
    connection file from the start."""
    for name in ("run.json", CONNECTION_FILE_NAME):
        try:
            with open(directory / name) as handle:
                run_id = json.load(handle).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(run_id, str):
            return run_id
    return None


class HistoryFill:
    """Reads one live run's recording into its state after each connection (module docstring); the I/O thread
    calls ``connected`` and then ``poll`` on every turn of its loop."""

    def __init__(self, state: RunState, logdir: str | None = None) -> None:
        self.state = state
        self.logdir = logdir
        self.reader = None
        self.run_id: str | None = None
        self.until = 0.0
        self.next_read = 0.0

    def connected(self, connection: str, run_id: str) -> None:
        """The I/O thread reached run ``run_id`` through ``connection`` (a connection file or an address)."""
        if self.reader is not None and self.run_id == run_id:
            self.until = time.monotonic() + FILL_WINDOW_S      # the same run again: fill what the wire missed
            return
        self.reader, self.run_id = None, run_id
        directory = find_recording(connection, run_id, self.logdir)
        if directory is None:
            return
        try:
            from revacnn.recording.reader import open_run

            self.reader = open_run(directory)
        except (ImportError, OSError):
            return
        with self.state.lock:
            self.state.recording_path = str(directory)
        self.until = time.monotonic() + FILL_WINDOW_S
        self.next_read = 0.0

    def poll(self) -> None:
        """Merge what the recording has (at most every ``FILL_EVERY_S``) until it reaches the wire's first step."""
        now = time.monotonic()
        if self.reader is None or now > self.until or now < self.next_read:
            return
        self.next_read = now + FILL_EVERY_S
        try:
            scalars = self.reader.scalars(every=self._thinning())
            val = recorded_validations(self.reader.val_predictions())
            commands = self.reader.steering_log()
        except Exception:      # a recording being written may be mid-append: the next turn reads it again
            return
        self.state.merge_history(recorded_columns(scalars), val, commands)
        first_live = self.state.first_live_step
        steps = scalars.get("step")
        if first_live is not None and steps is not None and len(steps) and steps.max() >= first_live - 1:
            self.until = 0.0       # the recording reaches the wire's first step: the history is whole

    def _thinning(self) -> int:
        """Every how many recorded steps to take so that the history fills at most half the state's ring (a long
        run's early curve thinned, its recent steps from the wire at full resolution)."""
        last = self.reader.last_step() or 0
        return max(1, math.ceil(last / max(1, self.state.scalar_capacity // 2)))
