"""A protocol client for one run: subscribe, join late, send commands. No torch (the dashboard uses it).

    client = RunClient("lightning_logs/version_0/revacnn")   # a run directory, a connection file or tcp://host:port
    welcome = client.connect()
    while (message := client.recv(timeout=1.0)) is not None:
        ...
    command_id = client.send_command("freeze", {"layers": ["net.conv1"]})

A run with CURVE on (docs/remote.md) also needs this client's allow-listed keypair; the trainer's public key comes
from the connection file (or ``server_key=`` with a bare ``tcp://`` address):

    client = RunClient("connection.json", client_keys="~/.revacnn/laptop.key_secret", host="gpu-box")
"""

from __future__ import annotations

import collections
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zmq

from zmq.utils.monitor import recv_monitor_message

from revacnn.wire.acks import is_terminal
from revacnn.wire.connection import ConnectionInfo, endpoint_is_ipv6, load_keypair, load_public_key, tcp_endpoint
from revacnn.wire.protocol import SUPPORTED_VERSIONS, TOPIC_PREFIX, Codec, Message, ProtocolError


class ConnectionFailed(RuntimeError):
    """The run could not be reached, or it speaks another protocol version."""


CLIENT_KEY_ENV = "REVACNN_CLIENT_KEY"
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "*")
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


class RunClient:
    """Client side of docs/protocol.md: a SUB socket for telemetry and a DEALER for control.

    ``recv`` returns messages from both, already validated; the state snapshot that follows ``welcome`` comes first
    and telemetry older than it is skipped (the clone pattern). ``gaps`` counts telemetry lost on the way.

    CURVE: ``client_keys`` is this client's keypair — a ``NAME.key_secret`` file from ``revacnn keys generate`` or
    a (public, secret) pair of Z85 keys; default ``$REVACNN_CLIENT_KEY``. ``server_key`` is the trainer's public key
    (Z85 or a ``.key`` file); default: the connection file's ``curve_server_key``. Giving a server key turns CURVE on.
    ``host`` replaces the host of the endpoints (a connection file written on another machine, or a wildcard bind).
    ``last_heard`` (time.monotonic) and ``silent_for()`` say when the run was last heard from: heartbeats come every
    second, so a few seconds of silence means the run stopped or became unreachable.
    """

    def __init__(self, target: str | Path, key: bytes | None = None, max_message_bytes: int = 1 << 30,
                 client_name: str = "revacnn-client", *, client_keys: str | os.PathLike | tuple | None = None,
                 server_key: str | bytes | os.PathLike | None = None, host: str | None = None) -> None:
        self.target = str(target)
        self.key = key
        self.client_name = client_name
        self.max_message_bytes = max_message_bytes
        self.host = host
        self.info: ConnectionInfo | None = None
        self.control_endpoint, self.telemetry_endpoint = self._endpoints()
        self.server_key = load_public_key(server_key) if server_key is not None else None
        if self.server_key is None and self.info is not None and self.info.security == "curve":
            if not self.info.curve_server_key:
                raise ValueError(f"{self.target} says the run uses CURVE but names no curve_server_key")
            self.server_key = load_public_key(self.info.curve_server_key)
        self.client_keys: tuple[bytes, bytes] | None = None
        if client_keys is None and os.environ.get(CLIENT_KEY_ENV):
            client_keys = os.environ[CLIENT_KEY_ENV]
        if self.server_key is not None:
            if client_keys is None:
                raise ValueError(
                    "this run uses CURVE: pass client_keys= (a NAME.key_secret file made by `revacnn keys generate`, "
                    f"whose NAME.key the trainer allowed with `revacnn keys allow`) or set ${CLIENT_KEY_ENV}")
            self.client_keys = load_keypair(client_keys)
        self.last_state: str | None = None
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
            return self._rehost(self.target), None
        self.info = ConnectionInfo.read(self.target)
        if self.key is None:
            self.key = self.info.key_bytes
        return self._rehost(self.info.control), self._rehost(self.info.telemetry)

    def _rehost(self, endpoint: str) -> str:
        """Put ``host`` (or, for a wildcard bind, the connection file's host name) into a tcp endpoint."""
        parsed = urlparse(endpoint)
        host = self.host
        if host is None and parsed.hostname in _WILDCARD_HOSTS and self.info is not None and self.info.host:
            host = self.info.host
        if host is None or parsed.port is None:
            return endpoint
        return tcp_endpoint(host, parsed.port)

    def _secure(self, sock: zmq.Socket) -> None:
        if self.server_key is not None:
            sock.curve_serverkey = self.server_key
            sock.curve_publickey, sock.curve_secretkey = self.client_keys

    def silent_for(self) -> float:
        """Seconds since anything was last heard from the run (inf before the first message)."""
        return time.monotonic() - self.last_heard if self.last_heard else float("inf")

    # -- connecting ----------------------------------------------------------------------------------------------
    def connect(self, timeout: float = 5.0) -> dict[str, Any]:
        """Subscribe, say hello and wait for ``welcome``; raises ``ConnectionFailed`` with the reason.

        The clone pattern: the subscription is connected before the state snapshot is asked for, so nothing
        published after the snapshot is missed. Given a bare control address, a first hello learns the telemetry
        port and a second one, once subscribed, fetches the snapshot.
        """
        self.close_sockets()
        deadline = time.monotonic() + timeout
        self._dealer = self._context.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.setsockopt(zmq.IMMEDIATE, 1)  # never queue commands for a run that is not there
        self._dealer.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._secure(self._dealer)
        self._poller.register(self._dealer, zmq.POLLIN)
        self._connect_awaiting_handshake(self._dealer, self.control_endpoint, deadline, timeout)
        if self.telemetry_endpoint:
            self._subscribe(self.telemetry_endpoint, deadline, timeout)
        welcome = self._hello(deadline, timeout)
        if self.telemetry_endpoint is None:
            # A bare control address: reach telemetry on the same host (a tunnel forwards both ports).
            port = urlparse(str(welcome.body.get("telemetry", ""))).port
            if port is None:
                raise ConnectionFailed("the welcome did not name a telemetry endpoint")
            self.telemetry_endpoint = tcp_endpoint(urlparse(self.control_endpoint).hostname or "", port)
            self._subscribe(self.telemetry_endpoint, deadline, timeout)
            welcome = self._hello(deadline, timeout)  # its state snapshot postdates the subscription
        return self._welcomed(welcome, deadline)

    def _hello(self, deadline: float, timeout: float) -> Message:
        """Send ``hello`` and return the ``welcome`` that answers it (earlier replies are skipped)."""
        request = f"hello-{uuid.uuid4().hex[:8]}"
        try:
            self._send("hello", {"req": request, "versions": list(SUPPORTED_VERSIONS), "client": self.client_name},
                       wait=max(0.0, deadline - time.monotonic()))
        except zmq.Again:
            raise ConnectionFailed(f"cannot reach {self.control_endpoint} within {timeout:.1f} s (is the "
                                   "trainer running, and the address or SSH tunnel right?)") from None
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
                return message
        raise ConnectionFailed(f"no answer from {self.control_endpoint} within {timeout:.1f} s "
                               "(is the trainer running, and the address or SSH tunnel right?)")

    def _connect_awaiting_handshake(self, sock: zmq.Socket, endpoint: str, deadline: float, timeout: float) -> None:
        if endpoint_is_ipv6(endpoint):  # without it libzmq cannot connect to an IPv6 address
            sock.setsockopt(zmq.IPV6, 1)
        monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        try:
            sock.connect(endpoint)
            self._await_handshake(monitor, endpoint, deadline, timeout)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)

    def _await_handshake(self, monitor: zmq.Socket, endpoint: str, deadline: float, timeout: float) -> None:
        """Wait for the security handshake; a refused key or a security mismatch is a clear ConnectionFailed."""
        failures = 0
        while time.monotonic() < deadline:
            if not monitor.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                continue
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            failures += 1
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise ConnectionFailed(
                    f"{endpoint} refused this client's key (ZAP status {event['value']}): allow-list "
                    "its public key on the trainer with `revacnn keys allow CLIENT.key --keys-dir DIR`")
            if failures >= 2:
                mode = "with CURVE" if self.server_key is not None else "without CURVE"
                raise ConnectionFailed(
                    f"the security handshake with {endpoint} failed ({mode}): the run's security "
                    "settings or its server key differ from this client's (use the run's connection file)")
        raise ConnectionFailed(f"cannot reach {endpoint} within {timeout:.1f} s (is the trainer "
                               "running, the address or SSH tunnel right, and — with CURVE — the server key the "
                               "run's?)")

    def _welcomed(self, welcome: Message, deadline: float) -> dict[str, Any]:
        self.welcome = welcome.body
        self.run_id = welcome.body.get("run", self.run_id)
        self.codec.run_id = self.run_id
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

    def _subscribe(self, endpoint: str, deadline: float, timeout: float) -> None:
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 1000)
        self._sub.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX)
        self._secure(self._sub)
        self._poller.register(self._sub, zmq.POLLIN)
        self._connect_awaiting_handshake(self._sub, endpoint, deadline, timeout)

    # -- receiving -----------------------------------------------------------------------------------------------
    def recv(self, timeout: float = 0.1) -> Message | None:
        """The next message (state snapshot, telemetry, ack or error), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._queue:
            remaining = deadline - time.monotonic()
            for sock, _ in self._poller.poll(max(0, int(remaining * 1000))):
                self._read(sock)
            if not self._queue and time.monotonic() >= deadline:
                return None
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
        if message.type == "status" and isinstance(message.body.get("state"), str):
            self.last_state = message.body["state"]
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
            ended = (f" (it reported '{self.last_state}')" if is_terminal(self.last_state)
                     else "")
            raise ConnectionFailed(f"the run at {self.control_endpoint} is not reachable{ended}; command "
                                   f"{op!r} not sent") from None
        return command_id

    def request_state(self) -> None:
        try:
            self._send("state", {"req": f"state-{uuid.uuid4().hex[:8]}"})
        except zmq.Again:
            raise ConnectionFailed(f"the run at {self.control_endpoint} is not reachable") from None

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
