"""A protocol client for one run: subscribe, join late, send commands. No torch (the dashboard uses it).

    client = RunClient("lightning_logs/version_0/revacnn")   # a run directory, a connection file or tcp://host:port
    welcome = client.connect()
    while (message := client.recv(timeout=1.0)) is not None:
        ...
    command_id = client.send_command("freeze", {"layers": ["net.conv1"]})
"""

from __future__ import annotations

import collections
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zmq

from revacnn.connection import ConnectionInfo
from revacnn.protocol import SUPPORTED_VERSIONS, TOPIC_PREFIX, Codec, Message, ProtocolError


class ConnectionFailed(RuntimeError):
    """The run could not be reached, or it speaks another protocol version."""


class RunClient:
    """Client side of docs/protocol.md: a SUB socket for telemetry and a DEALER for control.

    ``recv`` returns messages from both, already validated; the state snapshot that follows ``welcome`` comes first
    and telemetry older than it is skipped (the clone pattern). ``gaps`` counts telemetry lost on the way.
    """

    def __init__(self, target: str | Path, key: bytes | None = None, max_message_bytes: int = 1 << 30,
                 client_name: str = "revacnn-client") -> None:
        self.target = str(target)
        self.key = key
        self.client_name = client_name
        self.max_message_bytes = max_message_bytes
        self.info: ConnectionInfo | None = None
        self.control_endpoint, self.telemetry_endpoint = self._endpoints()
        self.codec = Codec(self.info.run_id if self.info else "", self.key, max_bytes=max_message_bytes)
        self.run_id = self.info.run_id if self.info else ""
        self.welcome: dict[str, Any] | None = None
        self.gaps = 0
        self.bad_messages = 0
        self.received = 0
        self.last_heard = 0.0
        self._snapshot_seq = 0
        self._last_seq = 0
        self._queue: collections.deque[Message] = collections.deque()
        self._context = zmq.Context()
        self._sub: zmq.Socket | None = None
        self._dealer: zmq.Socket | None = None
        self._poller = zmq.Poller()

    def _endpoints(self) -> tuple[str, str | None]:
        if self.target.startswith("tcp://"):
            return self.target, None
        self.info = ConnectionInfo.read(self.target)
        if self.key is None:
            self.key = self.info.key_bytes
        return self.info.control, self.info.telemetry

    # -- connecting ----------------------------------------------------------------------------------------------
    def connect(self, timeout: float = 5.0) -> dict[str, Any]:
        """Subscribe, say hello and wait for ``welcome``; raises ``ConnectionFailed`` with the reason."""
        self.close_sockets()
        self._dealer = self._context.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.setsockopt(zmq.IMMEDIATE, 1)  # never queue commands for a run that is not there
        self._dealer.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._dealer.connect(self.control_endpoint)
        self._poller.register(self._dealer, zmq.POLLIN)
        if self.telemetry_endpoint:
            self._subscribe(self.telemetry_endpoint)
        request = f"hello-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + timeout
        try:
            self._send("hello", {"req": request, "versions": list(SUPPORTED_VERSIONS), "client": self.client_name},
                       wait=timeout)
        except zmq.Again:
            raise ConnectionFailed(f"cannot reach {self.control_endpoint} within {timeout:.1f} s (is the trainer "
                                   "running, and the address or SSH tunnel right?)") from None
        while time.monotonic() < deadline:
            if not self._dealer.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                continue
            try:
                message = self.codec.decode(self._dealer.recv_multipart(copy=False))
            except ProtocolError as error:
                raise ConnectionFailed(f"{self.control_endpoint} answered with a message this client cannot read "
                                       f"({error}); is it a revacnn run of another version?") from None
            if message.type == "error":
                raise ConnectionFailed(f"{self.control_endpoint} refused: {message.body.get('detail')}")
            if message.type == "welcome" and message.body.get("req") == request:
                return self._welcomed(message, deadline)
        raise ConnectionFailed(f"no answer from {self.control_endpoint} within {timeout:.1f} s "
                               "(is the trainer running, and the address or SSH tunnel right?)")

    def _welcomed(self, welcome: Message, deadline: float) -> dict[str, Any]:
        self.welcome = welcome.body
        self.run_id = welcome.body.get("run", self.run_id)
        self.codec.run_id = self.run_id
        if self.telemetry_endpoint is None:
            # A bare control address: reach telemetry on the same host (a tunnel forwards both ports).
            port = urlparse(str(welcome.body.get("telemetry", ""))).port
            if port is None:
                raise ConnectionFailed("the welcome did not name a telemetry endpoint")
            host = urlparse(self.control_endpoint).hostname
            self.telemetry_endpoint = f"tcp://{host}:{port}"
            self._subscribe(self.telemetry_endpoint)
        for _ in range(int(welcome.body.get("state_count", 0))):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._dealer.poll(max(1, int(remaining * 1000))):
                break
            message = self._decode(self._dealer.recv_multipart(copy=False), topic=False)
            if message is not None:
                self._snapshot_seq = max(self._snapshot_seq, message.seq)
                self._queue.append(message)
        self.last_heard = time.monotonic()
        return self.welcome

    def _subscribe(self, endpoint: str) -> None:
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 1000)
        self._sub.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX)
        self._sub.connect(endpoint)
        self._poller.register(self._sub, zmq.POLLIN)

    # -- receiving -----------------------------------------------------------------------------------------------
    def recv(self, timeout: float = 0.1) -> Message | None:
        """The next message (state snapshot, telemetry, ack or error), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._queue:
            remaining = deadline - time.monotonic()
            if remaining < 0:
                return None
            for sock, _ in self._poller.poll(max(0, int(remaining * 1000))):
                self._read(sock)
        return self._queue.popleft()

    def _read(self, sock: zmq.Socket) -> None:
        telemetry = sock is self._sub
        message = self._decode(sock.recv_multipart(copy=False), topic=telemetry)
        if message is None:
            return
        if telemetry:
            if message.seq <= self._snapshot_seq:
                return  # already reflected in the state snapshot
            if self._last_seq and message.seq > self._last_seq + 1:
                self.gaps += message.seq - self._last_seq - 1
            if message.seq < self._last_seq:  # the server restarted: a new sequence
                self._snapshot_seq = 0
            self._last_seq = message.seq
        self._queue.append(message)

    def _decode(self, frames: list, topic: bool) -> Message | None:
        try:
            message = self.codec.decode(frames, topic=topic)
        except ProtocolError:
            self.bad_messages += 1
            return None
        self.received += 1
        self.last_heard = time.monotonic()
        return message

    # -- sending -------------------------------------------------------------------------------------------------
    def _send(self, kind: str, body: dict[str, Any], wait: float = 1.0) -> None:
        """Send a request, waiting at most ``wait`` s for the connection (IMMEDIATE: nothing queues for later)."""
        if self._dealer is None:
            raise ConnectionFailed("not connected: call connect() first")
        if not self._dealer.poll(int(wait * 1000), zmq.POLLOUT):
            raise zmq.Again()
        self._dealer.send_multipart(self.codec.encode(Message(kind, body)), flags=zmq.NOBLOCK)

    def send_command(self, op: str, args: dict[str, Any] | None = None, command_id: str | None = None) -> str:
        """Send a steering command; its acks arrive through ``recv``. Returns the command id."""
        command_id = command_id or uuid.uuid4().hex
        try:
            self._send("command", {"req": command_id[:64], "id": command_id, "op": op, "args": args or {}})
        except zmq.Again:
            raise ConnectionFailed(f"the run at {self.control_endpoint} is not reachable; command not sent") from None
        return command_id

    def request_state(self) -> None:
        self._send("state", {"req": f"state-{uuid.uuid4().hex[:8]}"})

    # -- closing -------------------------------------------------------------------------------------------------
    def close_sockets(self) -> None:
        for sock in (self._sub, self._dealer):
            if sock is not None:
                self._poller.unregister(sock)
                sock.close(linger=0)
        self._sub = self._dealer = None
        self._snapshot_seq = self._last_seq = 0

    def close(self) -> None:
        self.close_sockets()
        self._context.term()

    def __enter__(self) -> RunClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
