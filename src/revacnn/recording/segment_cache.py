"""``SegmentCache``: the readable segments of one stream, re-listed on every call and re-read only where they
changed. No torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from .format import list_segments, read_segment


class SegmentCache:
    """The readable segments of one stream, cached by (inode, size, mtime); ``parse`` turns a segment's Table into data."""

    def __init__(self, directory: Path, parse: Callable[[pa.Table], Any] | None = None):
        self.directory = directory
        self.parse = parse
        self.cache: dict[Path, tuple] = {}

    def read(self) -> list[tuple[Path, Any]]:
        out = []
        paths = list_segments(self.directory)
        for path in paths:
            try:
                stat = os.stat(path)
            except FileNotFoundError:       # retired between listing and reading
                continue
            key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)   # a re-packed segment is a new inode
            cached = self.cache.get(path)
            if cached is None or cached[0] != key:
                _, table, _ = read_segment(path)
                data = None
                if table is not None and table.num_rows:
                    data = self.parse(table) if self.parse else table
                cached = (key, data)
                self.cache[path] = cached
            if cached[1] is not None:
                out.append((path, cached[1]))
        for path in set(self.cache) - set(paths):
            del self.cache[path]
        return out

    def table(self) -> pa.Table | None:
        tables = [data for _, data in self.read()]
        if not tables:
            return None
        if len(tables) == 1:
            return tables[0]
        return pa.concat_tables(tables, promote_options="permissive")
