"""Snapshots: one safetensors file per snapshot message, ``snapshots/snapshot-<step>-<seq>.safetensors``. No torch.

Written under a temp name and renamed, so a reader sees a whole file or none. A resumed run's snapshots replace
those its checkpoint abandoned (``latest_timeline``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..wire.protocol import Message
from .format import to_json
from .timeline import latest_timeline

SNAPSHOTS = "snapshots"


def write_snapshot(run_dir: Path, message: Message) -> None:
    from safetensors.numpy import save_file

    body = message.body
    step = int(body.get("step") or 0)
    directory = run_dir / SNAPSHOTS
    directory.mkdir(exist_ok=True)
    name = f"snapshot-{step:010d}-{int(message.seq):010d}.safetensors"
    tmp = directory / f".{name}.tmp"
    arrays = {key: np.ascontiguousarray(value) for key, value in message.arrays.items()}
    metadata = {"type": "snapshot", "step": str(step), "seq": str(message.seq), "time": repr(message.time),
                "run": message.run, "body": to_json(body)}
    save_file(arrays, str(tmp), metadata=metadata)
    os.replace(tmp, directory / name)


def snapshot_files(run_dir: Path) -> list[tuple[int, int, Path]]:
    """``(step, seq, path)`` of every snapshot on the latest timeline, by step."""
    directory = run_dir / SNAPSHOTS
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    written = []
    for name in names:
        if name.startswith("snapshot-") and name.endswith(".safetensors"):
            try:
                _, step, seq = name[:-len(".safetensors")].split("-")
                path = directory / name
                written.append((path.stat().st_mtime_ns, int(step), int(seq), path))
            except (ValueError, FileNotFoundError):
                continue
    written.sort()  # in the order written (a resumed run's ``seq`` starts again)
    latest = latest_timeline(np.asarray([step for _, step, _, _ in written], np.int64))
    return sorted((step, seq, path) for (_, step, seq, path), keep in zip(written, latest) if keep)


def read_snapshot(path: Path, step: int) -> dict[str, Any]:
    """``{"body", "arrays", "step", "seq", "time"}`` of one snapshot file (``step``: where its metadata has none)."""
    from safetensors import safe_open

    arrays = {}
    with safe_open(str(path), framework="numpy") as handle:
        meta = handle.metadata() or {}
        for key in handle.keys():
            arrays[key] = handle.get_tensor(key)
    return {"body": json.loads(meta.get("body", "{}")), "arrays": arrays, "step": int(meta.get("step", step)),
            "seq": int(meta.get("seq", 0)), "time": float(meta.get("time", "nan"))}
