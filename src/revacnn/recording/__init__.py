"""Run recording: ``RunRecorder`` writes a run directory; ``reader.open_run`` / ``reader.list_runs`` read it back.

Nothing here imports torch, and importing the package loads nothing more (pyarrow loads with the writer or the
reader; ``lineage`` needs neither). Layout, crash-safety and downsampling policy: docs/design.md, "Recording".

Write side: writer.py (``RunRecorder``, the background thread) → run_writer.py (messages into rows) → rows.py,
pyramid.py (per-filter level pyramid), snapshots.py → stream.py (segment files). Read side: reader.py
(``RunReader``) → filter_series.py (the pyramid read back), snapshots.py → segment_cache.py. Shared: format.py (the
layout), timeline.py (which rows a reader returns), lineage.py (layers renamed by a command).
"""

from __future__ import annotations

__all__ = ["RunRecorder", "list_runs", "open_run"]


def __getattr__(name: str):
    if name == "RunRecorder":
        from .writer import RunRecorder

        return RunRecorder
    if name in ("list_runs", "open_run", "RunReader"):
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'revacnn.recording' has no attribute {name!r}")
