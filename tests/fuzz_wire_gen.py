"""Seeded generators of hostile protocol messages for tests/test_fuzz_wire.py (not a test module).

Plain ``random.Random`` instead of hypothesis: about a hundred times faster per message, so a CI-sized run can send
more than 100,000 messages. Every generator takes the ``Random`` it draws from, so a seed fixes the whole run.
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import msgpack
import numpy as np

from revacnn.wire.protocol import ALLOWED_DTYPES, MESSAGE_TYPES

#: The header fields of docs/protocol.md §2.
HEADER_FIELDS = ("v", "type", "run", "seq", "time", "body", "buffers")

F16, F32, F64 = np.finfo(np.float16), np.finfo(np.float32), np.finfo(np.float64)
BF16_MAX = 3.3895313892515355e38    # torch.finfo(torch.bfloat16).max
BF16_TINY = 1.1754943508222875e-38  # bfloat16 has float32's exponent range

#: Numbers at and around the limits of every float dtype a model can hold, plus the usual suspects.
EDGE_FLOATS = (
    float(F16.max), float(F16.max) * 1.0001, 65520.0, float(F16.tiny), float(F16.smallest_subnormal), 3e-8,
    BF16_MAX, BF16_MAX * 1.0001, BF16_TINY,
    float(F32.max), float(F32.max) * 1.0001, 3e38, float(F32.tiny), float(F32.smallest_subnormal), 1e-45,
    float(F64.max), float(F64.max) * 0.9999, float(F64.tiny), 5e-324, 1e-320, 1e39, 1e308,
    -0.0, 0.0, 1.0, -1.0, 0.05, math.nan, math.inf, -math.inf, -1e39, -float(F32.max),
)
EDGE_INTS = (0, 1, -1, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -(2 ** 63), 65504, 65520, 10 ** 19)
EDGE_NUMBERS = EDGE_FLOATS + EDGE_INTS + (True, False)

TEXTS = ("", "x", "naïve ☃", "\u202e\x00", "a" * 65, "a" * 300, "net.conv1", "🦄" * 70, "conv1", "fc", "status",
         "command", "HELLO", "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"))


def ext(rng: random.Random) -> Any:
    """A MessagePack extension value: an application type (0…127) or a timestamp (type −1)."""
    if rng.random() < 0.25:
        return msgpack.Timestamp(rng.randrange(-(2 ** 33), 2 ** 33), rng.randrange(10 ** 9))
    return msgpack.ExtType(rng.choice([0, 1, 42, 127]), rng.randbytes(rng.choice([0, 1, 4, 8, 12, 300])))


def scalar(rng: random.Random) -> Any:
    """One hostile leaf value: None, bools, edge numbers, odd strings, bytes, an extension type."""
    pick = rng.randrange(10)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice(EDGE_FLOATS)
    if pick == 3:
        return clamp_packable(rng.choice(EDGE_INTS) * rng.choice([1, 1, -1]))
    if pick == 4:
        return rng.uniform(-1e6, 1e6)
    if pick == 5:
        return rng.choice(TEXTS)
    if pick == 6:
        return rng.randbytes(rng.choice([0, 1, 8, 40]))
    if pick == 7:
        return ext(rng)
    if pick == 8:
        return rng.randint(-5, 5)
    return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(8)))


def value(rng: random.Random, depth: int = 0) -> Any:
    """A hostile value: a leaf, or a list or map (keys of any packable type) nested a few levels."""
    pick = rng.random()
    if depth >= 3 or pick < 0.6:
        return scalar(rng)
    if pick < 0.8:
        return [value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = [rng.choice(TEXTS), rng.randint(-3, 3), rng.randbytes(2), None, True, 1.5]
    return {rng.choice(keys): value(rng, depth + 1) for _ in range(rng.randrange(5))}


def deep(levels: int) -> Any:
    """A list nested ``levels`` deep (the decoder's plain-value check stops at 16)."""
    out: Any = 0
    for _ in range(levels):
        out = [out]
    return out


def clamp_packable(x: Any) -> Any:
    """msgpack cannot pack ints outside [-2**63, 2**64-1]; map them to the nearest packable one."""
    if isinstance(x, int) and not isinstance(x, bool):
        return max(-(2 ** 63), min(2 ** 64 - 1, x))
    return x


# -- header fields --------------------------------------------------------------------------------------------------
def valid_field(rng: random.Random, name: str, kind: str) -> Any:
    """A valid value of one header field (so that a message can be hostile in exactly one field)."""
    return {"v": 1, "type": kind, "run": rng.choice(["", "fuzz-run", "r" * 200]), "seq": rng.randrange(0, 2 ** 40),
            "time": rng.uniform(0, 2e9), "body": {"req": "r"}, "buffers": []}[name]


def hostile_field(rng: random.Random, name: str) -> Any:
    """A wrong value for header field ``name``: wrong type, list, map, ext, bytes, huge int, NaN, negative…"""
    special = {
        "v": [0, 2, -1, 2 ** 64 - 1, -(2 ** 63), True, 1.0, "1", None, [1], {"v": 1}, b"\x01"],
        "type": [["hello"], {"hello": 1}, ["command", "state"], {}, [], b"hello", 1, None, True, 1.5, "HELLO",
                 "nope", "", "hello\x00", "a" * 300],
        "run": [["r"], {"r": 1}, b"run", 7, None, "r" * 201, "r" * 5000],
        "seq": [-1, -(2 ** 63), 2 ** 64 - 1, True, 1.5, math.nan, "1", [1], {"1": 1}, None],
        "time": [math.nan, math.inf, -math.inf, -1.0, True, "now", [0.0], {"t": 0}, None, 2 ** 64 - 1, 1e308],
        "body": [[], [{"req": "r"}], "body", 3, None, b"body", {"x": math.nan}, {"x": math.inf}, {1: "int key"},
                 {"req": deep(20)}, {"req": ["r"] * 1000}],
        "buffers": [{}, "x", 3, None, [1], [[]], [{"name": "x"}], [{"name": "x", "dtype": "<f4", "shape": [1]}],
                    [{"name": "x", "dtype": "|O", "shape": [1]}]],
    }[name]
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(special)
    if roll < 0.65:
        return ext(rng)
    return value(rng)


def buffer_entry(rng: random.Random, frame_len: int) -> Any:
    """A buffer-table entry, honest about ``frame_len`` bytes or lying about its size, dtype, shape or name."""
    dtype = rng.choice(sorted(ALLOWED_DTYPES))
    size = np.dtype(dtype).itemsize
    honest = [frame_len // size] if frame_len % size == 0 else [frame_len]
    shape = rng.choice([
        honest, honest, [frame_len // size + 1], [max(0, frame_len // size - 1)], [2 ** 39, 2 ** 39], [-1],
        [2 ** 40], [2 ** 40 - 1] * 8, [1] * 9, [True], [1.0], "3", None, [[1]], {"n": 1}, [2 ** 64 - 1], [0],
    ])
    entry = {"name": rng.choice(["x", "y", "", "a" * 201, None, 3, ["x"], b"x"]),
             "dtype": rng.choice([dtype, dtype, "<f4", "|O", "O", ">f4", "<U4", "V8", "", None, ["<f4"], 4,
                                  b"<f4", ext(rng)]),
             "shape": shape}
    for key in list(entry):
        if rng.random() < 0.05:
            del entry[key]
    return entry if rng.random() < 0.9 else value(rng)


def header_frames(rng: random.Random, kind: str | None = None, hostile: dict | None = None) -> list[bytes]:
    """Frames ``[header, signature, *buffers]`` of one message; each field is hostile with some probability (or as
    ``hostile`` says), the header may be truncated or padded, and the buffer table may lie about the frames."""
    kind = kind or rng.choice(sorted(MESSAGE_TYPES))
    header: dict[Any, Any] = {}
    for name in HEADER_FIELDS:
        if hostile is not None:
            header[name] = hostile[name] if name in hostile else valid_field(rng, name, kind)
        else:
            header[name] = hostile_field(rng, name) if rng.random() < 0.15 else valid_field(rng, name, kind)
    if hostile is None:
        for name in HEADER_FIELDS:
            if rng.random() < 0.04:
                del header[name]  # missing fields
        if rng.random() < 0.05:
            header[rng.choice(["extra", 3, b"k"])] = value(rng)  # unknown keys, non-string keys
    buffers = [rng.randbytes(rng.choice([0, 1, 2, 4, 8, 12, 16, 64])) for _ in range(rng.choice([0, 0, 0, 1, 2, 3]))]
    if hostile is None and "buffers" in header and rng.random() < 0.5:
        header["buffers"] = [buffer_entry(rng, len(frame)) for frame in buffers]
        if rng.random() < 0.2:  # the table and the frames disagree in number
            buffers.append(b"\0" * 8) if rng.random() < 0.5 else buffers.pop() if buffers else None
    packed = msgpack.packb(header, use_bin_type=True)
    cut = rng.random()
    if hostile is None and cut < 0.08:
        packed = packed[: rng.randrange(len(packed) + 1)]  # truncated
    elif hostile is None and cut < 0.10:
        packed += rng.randbytes(rng.randrange(1, 16))  # trailing garbage
    signature = rng.choice([b"", b"", b"00", b"x" * 64, rng.randbytes(32)])
    return [packed, signature, *buffers]


def raw_frames(rng: random.Random) -> list[bytes]:
    """Frames that need not be MessagePack at all: random bytes, msgpack of a non-map, too few or too many frames."""
    pick = rng.randrange(8)
    if pick == 0:
        return [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(1, 6))]
    if pick == 1:
        return [msgpack.packb(value(rng), use_bin_type=True), b""]
    if pick == 2:
        return [msgpack.packb({"v": 1, "type": "hello", "body": {"req": "r", "versions": [1]}})]  # no signature
    if pick == 3:  # more buffer frames than any control codec takes
        return [msgpack.packb({"v": 1, "type": "state", "body": {}, "buffers": []}), b"", *[b""] * 70]
    if pick == 4:  # a header frame of only a msgpack prefix byte (a map of 2**32-1 entries, a str32, …)
        return [bytes([rng.choice([0xDF, 0xDE, 0xDB, 0xDD, 0xC6, 0xC9, 0xC1, 0xD4])]) + rng.randbytes(4), b""]
    if pick == 5:  # a header whose declared map size lies
        return [b"\xdf" + struct.pack(">I", rng.choice([1, 7, 2 ** 16 + 1, 2 ** 31])) + b"\xa1v\x01", b""]
    if pick == 6:  # a declared array length that lies
        return [b"\x81\xa4body\xdd" + struct.pack(">I", rng.choice([2 ** 20 + 1, 2 ** 32 - 1])), b""]
    return [b"", b""]


def request_frames(rng: random.Random, seq: int) -> tuple[list[bytes], str]:
    """A well-framed ``hello``/``state``/``command`` request whose body is hostile; returns (frames, its req)."""
    kind = rng.choice(["hello", "state", "command", "command"])
    req = rng.choice(["r%d" % seq, "r%d" % seq, "", "q" * 64, "q" * 65, None, 3, ["r"]])
    body: dict[Any, Any] = {"req": req}
    if kind == "hello":
        body["versions"] = rng.choice([[1], [1, 2], [2], [], [True], [1.0], "1", None, [2 ** 64 - 1],
                                       [-(2 ** 63)], value(rng)])
        body["client"] = rng.choice(TEXTS)
    elif kind == "command":
        body["id"] = rng.choice(["c%d" % seq, "c%d" % seq, "", "i" * 65, None, 5, ["c"], {"c": 1}, b"c"])
        body["op"] = rng.choice(["pause", "set_hparams", "freeze", "", "🦄", None, ["pause"], {"op": 1}, 7,
                                 "o" * 201])
        body["args"] = rng.choice([{}, None, {"lr": rng.choice(EDGE_NUMBERS)}, [], "a", value(rng),
                                   {"layers": [value(rng) for _ in range(rng.randrange(4))]}])
    for _ in range(rng.choice([0, 0, 1, 2])):
        body[rng.choice(TEXTS)] = value(rng)
    body = {key: clamp_packable(item) for key, item in body.items()}
    header = {"v": 1, "type": kind, "run": "", "seq": seq, "time": 1.0, "body": body, "buffers": []}
    if rng.random() < 0.1:
        header[rng.choice(HEADER_FIELDS)] = hostile_field(rng, rng.choice(HEADER_FIELDS))
    return [msgpack.packb(header, use_bin_type=True), b""], req if isinstance(req, str) else ""


def one_field_sweep(rng: random.Random, repeats: int = 3) -> list[list[bytes]]:
    """For every header field and every message type, messages that are valid except in that one field."""
    out = []
    for name in HEADER_FIELDS:
        for kind in sorted(MESSAGE_TYPES):
            for _ in range(repeats):
                out.append(header_frames(rng, kind, {name: hostile_field(rng, name)}))
    return out
