"""Snapshots: one safetensors file per snapshot message, ``snapshots/snapshot-<step>-<seq>.safetensors``. No torch.

Written under a temp name and renamed, so a reader sees a whole file or none. A resumed run's snapshots replace
those its checkpoint abandoned (``latest_timeline``). ``write_snapshot`` can store the large float32 buffers
(``weight/``, ``grad/``, ``act/``, ``actgrad/``) as float16 or bfloat16 (``STORED_PREFIXES``); ``read_snapshot``
returns them as float32 again.

The files are plain safetensors, written and read by the few lines below rather than by ``safetensors.numpy``,
whose numpy side cannot hold bfloat16: the format is an 8-byte little-endian header length, a JSON header (dtype,
shape and byte range of each tensor, and ``__metadata__``, string to string), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..wire.protocol import Message
from .format import to_json
from .timeline import latest_timeline

SNAPSHOTS = "snapshots"
STORED_PREFIXES = ("weight/", "grad/", "act/", "actgrad/")   # the buffers ``snapshot_dtype`` applies to

_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
          np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32", np.dtype(np.uint16): "U16",
          np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 (the upper 16 bits of a float32), rounded to nearest even, as uint16; NaN stays NaN."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():              # rounding a NaN's low mantissa bits could carry it into ±inf
        rounded[nan] = 0x7FC0
    return rounded


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _stored_code(key: str, value: np.ndarray, dtype: str) -> str:
    """The safetensors dtype code one buffer is stored as under ``dtype``."""
    if dtype != "float32" and value.dtype == np.float32 and key.startswith(STORED_PREFIXES):
        return "F16" if dtype == "float16" else "BF16"
    if value.dtype not in _CODES:
        raise TypeError(f"snapshot buffer {key!r} has dtype {value.dtype}, which safetensors cannot store")
    return _CODES[value.dtype]


def _stored(value: np.ndarray, code: str) -> np.ndarray:
    """``value`` as written under ``code``: contiguous, little-endian."""
    if code == "F16" and value.dtype == np.float32:
        with np.errstate(over="ignore"):             # beyond ±65504 becomes ±inf, as documented
            return np.ascontiguousarray(value, np.float16)
    if code == "BF16":
        return to_bfloat16_bits(value)
    return np.ascontiguousarray(value, value.dtype.newbyteorder("<"))


def snapshot_name(step: int, seq: int) -> str:
    return f"snapshot-{step:010d}-{seq:010d}.safetensors"


def write_snapshot(run_dir: Path, message: Message, dtype: str = "float32") -> tuple[Path, int]:
    """Write one snapshot message; returns its path and size in bytes."""
    body = message.body
    step = int(body.get("step") or 0)
    directory = run_dir / SNAPSHOTS
    directory.mkdir(exist_ok=True)
    name = snapshot_name(step, int(message.seq))
    tmp = directory / f".{name}.tmp"
    metadata = {"type": "snapshot", "step": str(step), "seq": str(message.seq), "time": repr(message.time),
                "run": str(message.run), "body": to_json(body), "stored_dtype": dtype}
    header: dict[str, Any] = {"__metadata__": metadata}
    codes, offset = {}, 0
    for key, value in message.arrays.items():
        value = np.asarray(value)
        codes[key] = _stored_code(key, value, dtype)
        nbytes = value.size * (2 if codes[key] in ("F16", "BF16") else value.dtype.itemsize)
        header[key] = {"dtype": codes[key], "shape": list(value.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)              # the data starts 8-byte aligned, as safetensors writes it
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for key, value in message.arrays.items():        # converted one buffer at a time: one extra copy at most
            array = _stored(np.asarray(value), codes[key])
            handle.write(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
            del array
    os.replace(tmp, directory / name)
    return directory / name, 8 + len(text) + offset


def estimate_bytes(message: Message, dtype: str = "float32") -> int:
    """The size ``write_snapshot`` will give ``message`` (its buffers; the header is a few kB more)."""
    total = 4096 + len(to_json(message.body))
    for key, value in message.arrays.items():
        nbytes = int(getattr(value, "nbytes", 0))
        if dtype != "float32" and getattr(value, "dtype", None) == np.float32 and key.startswith(STORED_PREFIXES):
            nbytes //= 2
        total += nbytes + 128
    return total


def all_snapshot_files(run_dir: Path) -> list[tuple[int, int, Path, bool]]:
    """``(step, seq, path, on the latest timeline)`` of every snapshot file, in the order they were written."""
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
    return [(step, seq, path, bool(keep)) for (_, step, seq, path), keep in zip(written, latest)]


def snapshot_files(run_dir: Path) -> list[tuple[int, int, Path]]:
    """``(step, seq, path)`` of every snapshot on the latest timeline, by step."""
    return sorted((step, seq, path) for step, seq, path, latest in all_snapshot_files(run_dir) if latest)


def read_snapshot(path: Path, step: int) -> dict[str, Any]:
    """``{"body", "arrays", "step", "seq", "time"}`` of one snapshot file (``step``: where its metadata has none).
    Buffers stored as float16 or bfloat16 come back as float32."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(bytes(data[8:8 + length]))
        meta = header.pop("__metadata__", None) or {}
        arrays = {}
        base = 8 + length
        for key, spec in header.items():
            start, end = spec["data_offsets"]
            code = spec["dtype"]
            stored = np.dtype("<u2") if code == "BF16" else _DTYPES[code].newbyteorder("<")
            view = np.frombuffer(data, stored, (end - start) // stored.itemsize, base + start)
            if code == "BF16":
                array = from_bfloat16_bits(view)
            else:                                    # one copy out of the map (which closes below)
                array = view.astype(np.float32 if code == "F16" else _DTYPES[code])
            del view
            arrays[key] = array.reshape(spec["shape"])
    return {"body": json.loads(meta.get("body", "{}")), "arrays": arrays, "step": int(meta.get("step", step)),
            "seq": int(meta.get("seq", 0)), "time": float(meta.get("time", "nan")),
            "stored_dtype": meta.get("stored_dtype", "float32")}
