"""A revacnn protocol client written from docs/protocol.md alone (issue 30) — not a test module.

It deliberately imports nothing from revacnn: only pyzmq, msgpack, numpy and the standard library. If the document
and the server drift apart, tests/test_doc_client.py (which drives a real trainer through this client) fails.
Where the document left something open, the choice made here is marked ``DOC-GAP`` and listed in the test file's
docstring.

    client = DocClient.from_connection_file(path)
    welcome, state = client.connect()          # subscribe, wait until live, hello, welcome + state snapshot
    queued = client.command("pause", {})       # the "queued" ack
    final = client.wait_final(queued["id"])    # the "done" / "error" ack
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

VERSION = 1
TOPIC_PREFIX = b"revacnn."
# §2 Header: the dtype allow-list.
ALLOWED_DTYPES = ("<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "|b1")
MAX_BUFFER_NAME = 200
HEADER_KEYS = ("v", "type", "run", "seq", "time", "body", "buffers")


class DocProtocolError(ValueError):
    """A message from the server that breaks a rule of docs/protocol.md."""


@dataclass
class Msg:
    """One decoded message: the header's fields, the body and the buffers as numpy arrays."""

    type: str
    body: dict[str, Any]
    arrays: dict[str, np.ndarray]
    seq: int
    run: str
    time: float
    v: int
    topic: bytes | None = None
    buffer_table: list = field(default_factory=list)
    socket: str = ""  # "telemetry" or "control"


def load_connection(path) -> dict[str, Any]:
    """The connection file (§1). ``key`` is returned both as written and as the HMAC key bytes."""
    with open(path) as handle:
        info = json.load(handle)
    # DOC-GAP (§1/§2): the doc says "HMAC-SHA256 … with the connection key" and shows `"key": ""`; it does not say
    # the key is a hex string whose *decoded bytes* are the HMAC key. Using the hex text itself fails every check.
    info["key_bytes"] = bytes.fromhex(info["key"]) if info.get("key") else None
    return info


def sign(key: bytes | None, header: bytes, buffers) -> bytes:
    """§2: ASCII hex HMAC-SHA256 over the header and every buffer frame, in order; empty without a key."""
    if key is None:
        return b""
    mac = hmac.new(key, header, hashlib.sha256)
    for buffer in buffers:
        mac.update(buffer)
    return mac.hexdigest().encode("ascii")


def encode(type_: str, body: dict[str, Any], *, key: bytes | None, run: str = "", seq: int = 1,
           arrays: dict[str, np.ndarray] | None = None, v: int = VERSION, header_override: dict | None = None,
           raw_header: bytes | None = None, signature: bytes | None = None) -> list[bytes]:
    """Frames ``[header, signature, *buffers]`` of one request (no topic: requests go on the control socket).

    The ``*override``/``raw_header``/``signature`` arguments exist only to build malformed requests.
    """
    table, buffers = [], []
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        dtype = array.dtype.newbyteorder("<").str if array.dtype.itemsize > 1 else array.dtype.str
        array = array.astype(dtype, copy=False)
        table.append({"name": name, "dtype": dtype, "shape": list(array.shape)})
        buffers.append(array.tobytes())
    header = {"v": v, "type": type_, "run": run, "seq": seq, "time": time.time(), "body": body, "buffers": table}
    if header_override:
        header.update(header_override)
    header_bytes = raw_header if raw_header is not None else msgpack.packb(header, use_bin_type=True)
    return [header_bytes, sign(key, header_bytes, buffers) if signature is None else signature, *buffers]


def decode(frames: list[bytes], *, key: bytes | None, topic: bool) -> Msg:
    """Parse and check one message against §2; raises ``DocProtocolError`` on any broken rule."""
    frames = [bytes(frame) for frame in frames]
    topic_frame = None
    if topic:
        if not frames or not frames[0].startswith(TOPIC_PREFIX):
            raise DocProtocolError(f"telemetry message without a 'revacnn.' topic frame: {frames[:1]!r}")
        topic_frame, frames = frames[0], frames[1:]
    if len(frames) < 2:
        raise DocProtocolError(f"need header and signature frames, got {len(frames)}")
    header_bytes, signature, buffers = frames[0], frames[1], frames[2:]
    expected = sign(key, header_bytes, buffers)
    if key is None:
        if signature != b"":
            raise DocProtocolError("unkeyed connection, but the signature frame is not empty")
    elif not hmac.compare_digest(signature, expected):
        raise DocProtocolError("bad signature")
    header = msgpack.unpackb(header_bytes, raw=False)
    if not isinstance(header, dict):
        raise DocProtocolError("header is not a map")
    missing = [name for name in HEADER_KEYS if name not in header]
    if missing:
        raise DocProtocolError(f"header lacks {missing}")
    if header["v"] != VERSION:
        raise DocProtocolError(f"version {header['v']!r}")
    if not isinstance(header["seq"], int) or header["seq"] < 1:
        raise DocProtocolError(f"seq {header['seq']!r} (starts at 1)")
    if not isinstance(header["body"], dict):
        raise DocProtocolError("body is not a map")
    if topic_frame is not None and topic_frame != TOPIC_PREFIX + header["type"].encode():
        raise DocProtocolError(f"topic {topic_frame!r} does not name type {header['type']!r}")
    table = header["buffers"]
    if not isinstance(table, list) or len(table) != len(buffers):
        raise DocProtocolError(f"buffer table has {len(table)} entries for {len(buffers)} frames")
    arrays: dict[str, np.ndarray] = {}
    for entry, frame in zip(table, buffers):
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not name or len(name) > MAX_BUFFER_NAME or name in arrays:
            raise DocProtocolError(f"buffer name {name!r}")
        if dtype not in ALLOWED_DTYPES:
            raise DocProtocolError(f"buffer {name!r}: dtype {dtype!r} not on the allow-list")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise DocProtocolError(f"buffer {name!r}: shape {shape!r}")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if size != len(frame):
            raise DocProtocolError(f"buffer {name!r}: {len(frame)} bytes for {dtype}{shape} ({size})")
        arrays[name] = np.frombuffer(frame, dtype=dtype).reshape(shape)
    return Msg(type=header["type"], body=header["body"], arrays=arrays, seq=header["seq"], run=header["run"],
               time=header["time"], v=header["v"], topic=topic_frame, buffer_table=table)


class DocClient:
    """SUB + DEALER to one run; keeps every telemetry message (``telemetry``) and control reply (``control``) read."""

    def __init__(self, info: dict[str, Any], name: str = "doc-client") -> None:
        self.info = info
        self.key: bytes | None = info.get("key_bytes")
        self.run = info.get("run_id", "")
        self.name = name
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.dealer = self.context.socket(zmq.DEALER)
        for sock in (self.sub, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 10000)
        self._seq = itertools.count(1)
        self.telemetry: list[Msg] = []  # every telemetry message read, in arrival order
        self.control: list[Msg] = []    # every control reply read
        self._telemetry_unread: deque[Msg] = deque()
        self._control_unread: deque[Msg] = deque()
        self.welcome: Msg | None = None
        self.state: list[Msg] = []

    @classmethod
    def from_connection_file(cls, path, name: str = "doc-client") -> DocClient:
        return cls(load_connection(path), name)

    def close(self) -> None:
        self.sub.close(0)
        self.dealer.close(0)
        self.context.term()

    # -- sending --------------------------------------------------------------------------------------------------
    def send_frames(self, frames: list[bytes]) -> None:
        self.dealer.send_multipart(frames)

    def request(self, type_: str, body: dict[str, Any], **encode_args) -> None:
        # DOC-GAP (§2/§3): the header table is written for the server's messages; which fields a *request* needs
        # and what to put in `run` and `seq` is not said. Sent here: all seven, `run` from the connection file and
        # the client's own seq starting at 1. (The server accepts a request without `run`, `seq`, `time` or
        # `buffers`, and ignores `run`/`seq`.)
        self.send_frames(encode(type_, body, key=self.key, run=self.run, seq=next(self._seq), **encode_args))

    def new_req(self, prefix: str = "r") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    # -- receiving ------------------------------------------------------------------------------------------------
    def _pump(self, timeout: float) -> None:
        """Read whatever arrives within ``timeout`` seconds (at least one poll) into the unread queues."""
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        for sock, _ in poller.poll(max(0, int(timeout * 1000))):
            while sock.poll(0):
                frames = sock.recv_multipart()
                if sock is self.sub:
                    message = decode(frames, key=self.key, topic=True)
                    message.socket = "telemetry"
                    self.telemetry.append(message)
                    self._telemetry_unread.append(message)
                else:
                    message = decode(frames, key=self.key, topic=False)
                    message.socket = "control"
                    self.control.append(message)
                    self._control_unread.append(message)

    def recv_control(self, timeout: float = 5.0) -> Msg | None:
        return self._next(self._control_unread, timeout)

    def recv_telemetry(self, timeout: float = 5.0) -> Msg | None:
        return self._next(self._telemetry_unread, timeout)

    def _next(self, unread, timeout: float) -> Msg | None:
        """The oldest unread message of one socket, reading both sockets for up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not unread:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._pump(remaining)
        return unread.popleft()

    def pump_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._pump(deadline - time.monotonic())

    def wait_telemetry(self, predicate, timeout: float = 20.0) -> Msg:
        """The first telemetry message (already read or not) matching ``predicate``; AssertionError on timeout."""
        for message in self.telemetry:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.recv_telemetry(deadline - time.monotonic())
            if message is not None and predicate(message):
                return message
        raise AssertionError("no matching telemetry message within the timeout")

    def reply_to(self, req: str, timeout: float = 5.0, types=("welcome", "ack", "error")) -> Msg:
        """The next control reply of one of ``types`` carrying ``body.req == req``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.recv_control(deadline - time.monotonic())
            if message is not None and message.type in types and message.body.get("req") == req:
                return message
        raise AssertionError(f"no reply to {req!r} within {timeout} s")

    def next_reply(self, timeout: float = 5.0, types=("welcome", "ack", "error")) -> Msg:
        """The next control reply of one of ``types`` (for error replies, which may not echo ``req``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.recv_control(deadline - time.monotonic())
            if message is not None and message.type in types:
                return message
        raise AssertionError(f"no {types} reply within {timeout} s")

    # -- the clone pattern (§3) -----------------------------------------------------------------------------------
    def subscribe(self, endpoint: str, prefix: bytes = TOPIC_PREFIX, timeout: float = 10.0) -> Msg:
        """Subscribe and wait until the subscription is live; returns the first telemetry message.

        DOC-GAP (§3): "wait until the subscription is connected" gives no way to know. A SUB learns nothing when
        its subscription reaches the PUB, so the only proof is a message: the heartbeat (`status`, once a second,
        §4) arrives within about a second once it is live — which requires a `revacnn.` or `revacnn.status` prefix.
        """
        self.sub.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sub.connect(endpoint)
        message = self.recv_telemetry(timeout)
        if message is None:
            raise AssertionError(f"no telemetry from {endpoint} within {timeout} s")
        return message

    def hello(self, versions=(VERSION,), timeout: float = 10.0) -> tuple[Msg, list[Msg]]:
        """Say hello; return the welcome and the ``state_count`` snapshot messages that follow it."""
        req = self.new_req("hello")
        self.request("hello", {"req": req, "versions": list(versions), "client": self.name})
        welcome = self.reply_to(req, timeout, types=("welcome", "error"))
        if welcome.type == "error":
            return welcome, []
        return welcome, self.read_state(welcome.body["state_count"], timeout)

    def read_state(self, count: int, timeout: float = 10.0) -> list[Msg]:
        # DOC-GAP (§3): state-snapshot messages arrive on the control socket exactly as published but *without* the
        # topic frame, and carry no `req`: they are recognised only by position (after `welcome`, or as the next
        # `state_count` messages after a `state` request, whose count the reply does not restate).
        state = []
        deadline = time.monotonic() + timeout
        while len(state) < count and time.monotonic() < deadline:
            message = self.recv_control(deadline - time.monotonic())
            if message is not None:
                state.append(message)
        if len(state) != count:
            raise AssertionError(f"state snapshot: {len(state)} of {count} messages arrived")
        return state

    def connect(self, timeout: float = 15.0) -> tuple[Msg, list[Msg]]:
        """Subscribe to telemetry first, wait until live, then hello (the control socket is connected at once)."""
        self.dealer.connect(self.info["control"])
        self.subscribe(self.info["telemetry"], timeout=timeout)
        self.welcome, self.state = self.hello(timeout=timeout)
        return self.welcome, self.state

    # -- commands (§3 "Commands and acks") ------------------------------------------------------------------------
    def command(self, op: str, args: dict[str, Any] | None = None, command_id: str | None = None,
                timeout: float = 10.0) -> Msg:
        """Send one command; return the first ack to it (``queued``, or an immediate ``error``)."""
        command_id = command_id or f"{op}-{uuid.uuid4()}"
        req = self.new_req("cmd")
        self.request("command", {"req": req, "id": command_id, "op": op, "args": args if args is not None else {}})
        return self.reply_to(req, timeout, types=("ack", "error"))

    def wait_final(self, command_id: str, timeout: float = 30.0) -> tuple[Msg, Msg]:
        """The final ack of a command as sent to the requester (control) and as published (telemetry)."""
        deadline = time.monotonic() + timeout
        direct = published = None
        while (direct is None or published is None) and time.monotonic() < deadline:
            self._pump(min(0.2, max(0.0, deadline - time.monotonic())))
            for message in self.control:
                if (direct is None and message.type == "ack" and message.body.get("id") == command_id
                        and message.body.get("status") != "queued"):
                    direct = message
            for message in self.telemetry:
                if published is None and message.type == "ack" and message.body.get("id") == command_id:
                    published = message
        if direct is None or published is None:
            raise AssertionError(f"final ack of {command_id!r}: direct={direct is not None}, "
                                 f"published={published is not None} within {timeout} s")
        return direct, published
