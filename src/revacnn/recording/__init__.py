"""Run recording: ``RunRecorder`` writes a run directory; ``reader.open_run`` / ``reader.list_runs`` read it back.

Nothing here imports torch. Layout, crash-safety and downsampling policy: docs/design.md, "Recording".
"""

from __future__ import annotations

from .writer import RunRecorder

__all__ = ["RunRecorder", "list_runs", "open_run"]


def __getattr__(name: str):
    if name in ("list_runs", "open_run", "RunReader"):
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'revacnn.recording' has no attribute {name!r}")
