"""The wire protocol of docs/protocol.md: messages, framing, validation and signing. No torch.

``Codec`` is the one object that turns a ``Message`` into ZeroMQ frames and back. Everything that arrives from a
socket goes through ``Codec.decode``, which validates the header, the buffer table and the signature and raises
``ProtocolError`` with a short code and a sentence when anything is off. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
TOPIC_PREFIX = b"revacnn."

ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "|b1"})
MAX_NAME_LENGTH = 200
MAX_ID_LENGTH = 64

TELEMETRY_TYPES = frozenset({"structure", "hparams", "step", "steps", "snapshot", "val", "status", "ack"})
REQUEST_TYPES = frozenset({"hello", "state", "command"})
REPLY_TYPES = frozenset({"welcome", "ack", "error"})
MESSAGE_TYPES = TELEMETRY_TYPES | REQUEST_TYPES | REPLY_TYPES

FILTER_FIELDS = ("grad_abs_mean", "grad_sq_mean", "weight_norm", "update_ratio", "act_abs_mean")
STAT_FIELDS = ("min", "max", "mean", "median", "q1", "q3", "std", "l1", "l2", "l0", "count")


#: Fields of each request's body (docs/protocol.md §3). Other fields are dropped unread, so that a newer client's
#: optional fields still work, and so that they cost the I/O thread nothing.
REQUEST_FIELDS = {"hello": ("req", "versions", "client"), "state": ("req",), "command": ("req", "id", "op", "args")}


@dataclass(frozen=True)
class DecodeLimits:
    """What ``Codec.decode`` unpacks at most: per list, per map, per string, and in all lists and maps of a header
    together (``max_items``; None: no total). MessagePack stops at the first count over a limit, before it builds
    the values, so refusing a huge request costs next to nothing."""

    max_array_len: int = 1 << 20
    max_map_len: int = 1 << 16
    max_str_len: int = 1 << 20
    max_items: int | None = None
    request_fields: Mapping[str, tuple[str, ...]] | None = None


#: The limits of a control request (docs/protocol.md §5): a list may hold one entry per channel of a large layer.
REQUEST_LIMITS = DecodeLimits(max_array_len=65_536, max_map_len=1024, max_str_len=65_536, max_items=131_072,
                              request_fields=REQUEST_FIELDS)


class ProtocolError(ValueError):
    """An inbound message that breaks the protocol. ``code`` is one of the ``error`` values of docs/protocol.md;
    ``req`` is the request's ``body.req`` when its header could be read that far (echoed in the error reply)."""

    def __init__(self, code: str, detail: str, req: str = "") -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.req = req


class _TooManyItems(Exception):
    """Raised from inside msgpack's hooks: the header holds more list and map entries than ``max_items``."""


def _counting_hooks(limit: int) -> dict[str, Any]:
    """msgpack ``list_hook``/``object_hook`` that count the entries of every list and map as they are built and
    stop the unpacking once there are more than ``limit``."""
    count = 0

    def counted(container):
        nonlocal count
        count += len(container)
        if count > limit:
            raise _TooManyItems
        return container

    return {"list_hook": counted, "object_hook": counted}


def request_id(header: Any) -> str:
    """The ``body.req`` of a decoded header when it is a valid one (a string of at most 64 characters), else ""."""
    body = header.get("body") if isinstance(header, dict) else None
    req = body.get("req") if isinstance(body, dict) else None
    return req if isinstance(req, str) and len(req) <= MAX_ID_LENGTH else ""


@dataclass
class Message:
    """One protocol message: a type, a body of plain values and named numpy arrays."""

    type: str
    body: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    run: str = ""
    seq: int = 0
    time: float = 0.0
    v: int = PROTOCOL_VERSION

    @property
    def step(self) -> int | None:
        return self.body.get("step")


def _little_endian(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not np.little_endian):
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def dtype_code(dtype: np.dtype) -> str:
    """The allow-list spelling of a numpy dtype ('<f4', '|u1', …)."""
    return np.dtype(dtype).newbyteorder("<").str if np.dtype(dtype).itemsize > 1 else np.dtype(dtype).str


_SCALARS = (bool, int, str, type(None))


def _plain(value: Any, depth: int = 0) -> bool:
    """True when value holds only msgpack-safe plain types, nested at most 16 deep, no NaN/inf floats."""
    if depth > 16:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        # one pass, recursing only into containers: a list of 65,536 numbers costs a few milliseconds
        for item in value:
            if isinstance(item, float):
                if not math.isfinite(item):
                    return False
            elif not isinstance(item, _SCALARS) and not _plain(item, depth + 1):
                return False
        return True
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item, depth + 1) for key, item in value.items())
    return False


class Codec:
    """Encodes, decodes, validates and signs protocol messages for one run.

    ``key`` (bytes) turns on HMAC-SHA256 signatures: outgoing messages are signed and incoming ones must carry a valid
    signature. ``max_buffers`` and ``max_bytes`` bound what ``decode`` accepts.
    """

    def __init__(self, run_id: str = "", key: bytes | None = None, max_buffers: int = 4096,
                 max_bytes: int = 1 << 30, limits: DecodeLimits = DecodeLimits()) -> None:
        self.run_id = run_id
        self.key = key or None
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self.limits = limits
        self._seq = 0

    # -- outgoing ---------------------------------------------------------------------------------------------
    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def encode(self, message: Message, topic: bool = False) -> list:
        """Frames for ``message``: ``[topic?, header, signature, *buffers]``. Assigns seq/time/run when unset."""
        if not message.seq:
            message.seq = self.next_seq()
        if not message.time:
            message.time = time.time()
        if not message.run:
            message.run = self.run_id
        buffers = []
        table = []
        for name, array in message.arrays.items():
            array = _little_endian(array)
            table.append({"name": name, "dtype": dtype_code(array.dtype), "shape": list(array.shape)})
            buffers.append(array.reshape(-1).view(np.uint8) if array.size else b"")
        header = msgpack.packb(
            {"v": message.v, "type": message.type, "run": message.run, "seq": message.seq,
             "time": message.time, "body": message.body, "buffers": table},
            use_bin_type=True,
        )
        frames = [header, self.sign(header, buffers), *buffers]
        if topic:
            frames.insert(0, TOPIC_PREFIX + message.type.encode())
        return frames

    def sign(self, header: bytes, buffers) -> bytes:
        if self.key is None:
            return b""
        mac = hmac.new(self.key, header, hashlib.sha256)
        for buffer in buffers:
            mac.update(buffer)
        return mac.hexdigest().encode()

    # -- incoming ---------------------------------------------------------------------------------------------
    def decode(self, frames, topic: bool = False) -> Message:
        """Parse and validate frames (bytes or zmq.Frame); raise ``ProtocolError`` on anything malformed."""
        frames = [bytes(getattr(frame, "buffer", frame)) for frame in frames]
        if topic:
            if not frames or not frames[0].startswith(TOPIC_PREFIX):
                raise ProtocolError("bad_frame", "missing 'revacnn.' topic frame")
            frames = frames[1:]
        if len(frames) < 2:
            raise ProtocolError("bad_frame", f"expected header and signature frames, got {len(frames)} frame(s)")
        header_bytes, signature, buffers = frames[0], frames[1], frames[2:]
        if len(buffers) > self.max_buffers:
            raise ProtocolError("too_large", f"{len(buffers)} buffers exceed the limit of {self.max_buffers}")
        if sum(len(frame) for frame in frames) > self.max_bytes:
            raise ProtocolError("too_large", f"message exceeds {self.max_bytes} bytes")
        if self.key is not None and not hmac.compare_digest(signature, self.sign(header_bytes, buffers)):
            raise ProtocolError("bad_signature", "signature does not match the connection key")
        header = self._unpack(header_bytes)
        try:
            return self._decode_header(header, buffers)
        except ProtocolError as error:
            error.req = request_id(header)
            raise

    def _unpack(self, header_bytes: bytes) -> Any:
        """The header's MessagePack, within ``self.limits`` (no bin, no ext: the header holds plain values)."""
        limits = self.limits
        hooks = _counting_hooks(limits.max_items) if limits.max_items is not None else {}
        try:
            return msgpack.unpackb(header_bytes, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0,
                                   max_str_len=limits.max_str_len, max_array_len=limits.max_array_len,
                                   max_map_len=limits.max_map_len, **hooks)
        except _TooManyItems:
            raise ProtocolError("too_large", f"the header holds more than {limits.max_items:,} list and map entries "
                                             "in all") from None
        except ValueError as error:
            if "max_bin_len" in str(error) or "max_ext_len" in str(error):
                raise ProtocolError("bad_header", "the header holds a binary or extension value; its fields are "
                                                  "strings, numbers, booleans, nil, lists and maps") from None
            if "exceeds max_" in str(error):  # msgpack's "70000 exceeds max_array_len(65536)"
                raise ProtocolError("too_large", f"a list, map or string of the header is too long ({error})") \
                    from None
            raise ProtocolError("bad_header", f"header is not valid MessagePack ({type(error).__name__})") from None
        except Exception as error:  # msgpack raises several types for malformed input
            raise ProtocolError("bad_header", f"header is not valid MessagePack ({type(error).__name__})") from None

    def _decode_header(self, header: Any, buffers: list[bytes]) -> Message:
        """Validate an unpacked header and its buffers (every field of the wrong type is a ``bad_header``)."""
        if not isinstance(header, dict):
            raise ProtocolError("bad_header", "header must be a map")
        version = header.get("v")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError("bad_header", "header field 'v' must be an integer")
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError("unsupported_version",
                                f"protocol version {version} is not supported (supported: {list(SUPPORTED_VERSIONS)})")
        kind = header.get("type")
        if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
            raise ProtocolError("bad_header", f"header field 'type' must be a message type, got {_short_repr(kind)}")
        body = header.get("body", {})
        if not isinstance(body, dict):
            raise ProtocolError("bad_header", "header field 'body' must be a map")
        fields = (self.limits.request_fields or {}).get(kind)
        if fields is not None:  # a request: its known fields only, the rest unread
            body = {name: body[name] for name in fields if name in body}
        if not _plain(body):
            raise ProtocolError("bad_header", "header field 'body' must be a map of plain values (no NaN/inf)")
        seq, stamp, run = header.get("seq", 0), header.get("time", 0.0), header.get("run", "")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ProtocolError("bad_header", "header field 'seq' must be a non-negative integer")
        if not isinstance(stamp, (int, float)) or isinstance(stamp, bool) or not math.isfinite(stamp):
            raise ProtocolError("bad_header", "header field 'time' must be a finite number")
        if not isinstance(run, str) or len(run) > MAX_NAME_LENGTH:
            raise ProtocolError("bad_header", "header field 'run' must be a string")
        arrays = self._decode_buffers(header.get("buffers", []), buffers)
        return Message(type=kind, body=body, arrays=arrays, run=run, seq=seq, time=float(stamp), v=version)

    def _decode_buffers(self, table: Any, buffers: list[bytes]) -> dict[str, np.ndarray]:
        if not isinstance(table, list) or len(table) != len(buffers):
            listed = len(table) if isinstance(table, list) else "?"
            raise ProtocolError("bad_header", f"header field 'buffers' lists {listed} buffers but {len(buffers)} "
                                              "buffer frames arrived")
        arrays: dict[str, np.ndarray] = {}
        for entry, frame in zip(table, buffers):
            if not isinstance(entry, dict):
                raise ProtocolError("bad_header", "each buffer entry must be a map")
            name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
            if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or name in arrays:
                raise ProtocolError("bad_header", f"buffer name {_short_repr(name)} is missing, too long or repeated")
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise ProtocolError("bad_header", f"buffer {name!r}: dtype {_short_repr(dtype)} is not allowed")
            if (not isinstance(shape, list) or len(shape) > 8
                    or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 40 for n in shape)):
                raise ProtocolError("bad_header", f"buffer {name!r}: shape must be a list of ≤ 8 non-negative ints")
            expected = math.prod(shape) * np.dtype(dtype).itemsize
            if expected != len(frame):
                raise ProtocolError("bad_frame",
                                    f"buffer {name!r}: {len(frame)} bytes, but {dtype}{shape} needs {expected}")
            arrays[name] = np.frombuffer(frame, dtype=dtype).reshape(shape)
        return arrays


def error_body(request: str, code: str, detail: str) -> dict[str, Any]:
    return {"req": request, "error": code, "detail": detail}


def validate_request(message: Message) -> None:
    """Check the body of an inbound control request; raise ``ProtocolError('bad_request', …)`` when wrong (with the
    request's ``req`` where it is a valid one, to echo)."""
    try:
        _check_request(message)
    except ProtocolError as error:
        error.req = request_id({"body": message.body})
        raise


def _check_request(message: Message) -> None:
    body = message.body
    if message.type not in REQUEST_TYPES:
        raise ProtocolError("bad_request", f"{message.type!r} is not a request type (use hello, state or command)")
    request = body.get("req", "")
    if not isinstance(request, str) or len(request) > MAX_ID_LENGTH:
        raise ProtocolError("bad_request", f"'req' must be a string of at most {MAX_ID_LENGTH} characters")
    if message.type == "hello":
        versions = body.get("versions")
        if not isinstance(versions, list) or not versions or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in versions):
            raise ProtocolError("bad_request", "hello needs 'versions': a non-empty list of integers")
    elif message.type == "command":
        command_envelope(body)


def command_envelope(command: Any) -> tuple[str, str, dict[str, Any]]:
    """Check a steering command's envelope ``{"id": str, "op": str, "args": map}`` and return its parts (``args``
    missing or null is ``{}``); raise ``ProtocolError('bad_request', …)`` when wrong. Whether the op exists and
    which fields it takes is the trainer's business (``revacnn.steering.commands``)."""
    if not isinstance(command, Mapping):
        raise ProtocolError("bad_request", f"command must be a dict with id, op and args, got "
                                           f"{type(command).__name__}")
    command_id, op, args = command.get("id"), command.get("op"), command.get("args")
    if not isinstance(command_id, str) or not command_id or len(command_id) > MAX_ID_LENGTH:
        raise ProtocolError("bad_request", f"command 'id' must be a non-empty string of at most {MAX_ID_LENGTH} "
                                           f"characters, got {_short_repr(command_id)}")
    if not isinstance(op, str) or not op or len(op) > MAX_NAME_LENGTH:
        raise ProtocolError("bad_request", f"command 'op' must be a string of 1 to {MAX_NAME_LENGTH} characters, "
                                           f"got {_short_repr(op)}")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ProtocolError("bad_request", f"'args' of {op} must be a dict (a map), got {type(args).__name__}")
    return command_id, op, dict(args)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
