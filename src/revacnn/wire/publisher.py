"""The trainer's I/O thread: owns the telemetry PUB and control ROUTER sockets. No torch.

The training thread only appends to an in-memory queue (``publish``, ``send_ack``) and drains validated commands
(``poll_commands``); it never touches a socket and never waits. Telemetry items may still be in flight on the
device (``PendingMessage``): the I/O thread resolves them once their copy to host has finished, in order.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

import zmq
from zmq.auth.thread import ThreadAuthenticator

from revacnn import __version__
from revacnn.wire.acks import ERROR, QUEUED, ack, final_state, initial_status
from revacnn.wire.connection import CurveServerKeys
from revacnn.wire.protocol import (
    SUPPORTED_VERSIONS,
    TOPIC_PREFIX,
    Codec,
    Message,
    ProtocolError,
    command_envelope,
    error_body,
    validate_request,
)

log = logging.getLogger(__name__)

#: Message types whose latest instance a late joiner receives, in this order (docs/protocol.md §3); the latest step
#: with per-filter data, the latest ``step`` and the latest batch of ``steps`` are sent in step order among themselves.
STATE_ORDER = ("structure", "hparams", "status", "step_filters", "step", "steps", "snapshot", "val")
STEP_KEYS = ("step_filters", "step", "steps")
#: Types that are never dropped when the queue is full (low volume, and a client cannot do without them).
ESSENTIAL_TYPES = frozenset({"structure", "hparams", "status", "ack"})
CONTROL_MAX_BYTES = 1 << 20
MAX_PENDING_COMMANDS = 1000
MAX_REMEMBERED_ACKS = 10_000
ZAP_DOMAIN = "revacnn"


class Pending(Protocol):
    """A telemetry message whose arrays are still being copied from the device."""

    type: str

    def ready(self) -> bool: ...

    def resolve(self) -> Message: ...


class Sink(Protocol):
    """Receives every resolved message (the run recorder). ``submit`` must not block."""

    def submit(self, message: Message) -> bool: ...


def is_loopback(host: str) -> bool:
    """True for a loopback address, or a host name that resolves to one (an unresolvable name is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


class _CountingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, counting the CURVE clients it turned away (published in ``status.security``)."""

    denied = 0
    accepted = 0

    async def _authenticate_curve(self, domain, client_key):
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if allowed:
            self.accepted += 1
        else:
            self.denied += 1
        return allowed, reason


class Publisher:
    """Background thread owning every socket of a run.

    ``queue_size`` bounds the telemetry items waiting for the thread; when it is full, new telemetry is dropped and
    counted (``drops``). Structure, hyper-parameter, status and ack messages are never dropped; they are sent at once,
    telemetry every ``send_interval`` seconds (or as soon as half the queue is waiting).

    ``curve`` (``CurveServerKeys``) turns on CURVE encryption and authentication on both sockets: only clients whose
    public key is in the allow-list complete the handshake; others receive nothing and cannot send anything. A
    ZAP authenticator thread runs in this publisher's own ZeroMQ context. The allow-list directory is re-read when
    its files change. Without CURVE a non-loopback ``host`` is refused unless ``insecure_bind=True``.
    """

    def __init__(self, run_id: str, host: str = "127.0.0.1", telemetry_port: int = 0, control_port: int = 0,
                 key: bytes | None = None, send_hwm: int = 100, queue_size: int = 64, heartbeat_s: float = 1.0,
                 send_interval: float = 0.05,
                 sinks: Iterable[Sink] = (), insecure_bind: bool = False,
                 curve: CurveServerKeys | None = None) -> None:
        if not is_loopback(host) and curve is None and not insecure_bind:
            raise ValueError(
                f"refusing to bind the telemetry and steering sockets on {host!r} without CURVE: anyone who can "
                "reach it could read and steer this run. Keep the default 127.0.0.1 and use an SSH tunnel, or turn "
                "on CURVE (ReVACNNCallback(keys_dir=...), see docs/remote.md); insecure_bind=True skips this check "
                "for a network you trust completely.")
        if not is_loopback(host) and curve is None:
            log.warning("revacnn: INSECURE — telemetry and steering of run %s listen on %s without encryption or "
                        "authentication (insecure_bind=True): anyone who reaches this address can read and steer "
                        "the run", run_id, host)
        self.run_id = run_id
        self.host = host
        self.curve = curve
        self.auth: _CountingAuthenticator | None = None
        self._allowed_signature: tuple | None = None
        # One codec per socket, as each numbers its own messages (docs/protocol.md): a reply on the control socket
        # must not take a number from the telemetry stream, where a client counts every missing number as a drop.
        self.codec = Codec(run_id, key)
        self.control_codec = Codec(run_id, key, max_buffers=64, max_bytes=CONTROL_MAX_BYTES)
        self.send_hwm = send_hwm
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.send_interval = send_interval
        self.sinks = list(sinks)
        self.telemetry_endpoint = ""
        self.control_endpoint = ""
        self.drops = {"telemetry": 0}
        self.sent = 0
        self.internal_errors = 0
        self._requested_ports = (telemetry_port, control_port)
        self._outbox: collections.deque = collections.deque()
        self._telemetry_waiting = 0
        self._lock = threading.Lock()
        self._commands: collections.deque = collections.deque()
        self._acks: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._identities: dict[str, bytes] = {}
        self._state: dict[str, list] = {}
        self._state_step: dict[str, int] = {}    # the (last) step of each cached step message, to order them
        self._status: dict[str, Any] = initial_status()
        self._stop = threading.Event()
        # The I/O thread sleeps in zmq_poll until a request arrives, ``send_interval`` passes, or the training thread
        # wakes it through this socket pair (one byte per wake, only while no wake is pending). Telemetry does not
        # wake it: a wake hands the GIL to this thread while the training thread is in Python, which then waits
        # for the whole send; picked up every ``send_interval`` instead, it mostly runs while the training thread
        # is inside a torch op that released the GIL. Essential messages (acks, state changes), a half-full queue
        # and close() wake it.
        self._wake_reader, self._wake_writer = socket.socketpair()
        for end in (self._wake_reader, self._wake_writer):
            end.setblocking(False)
        self._wake_pending = False
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"revacnn-io-{run_id}", daemon=True)

    # -- training-thread API (never blocks) ------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Publisher:
        self._thread.start()
        if not self._bound.wait(timeout):
            raise TimeoutError("the revacnn I/O thread did not bind its sockets in time")
        if self._bind_error is not None:
            raise OSError(f"revacnn could not bind its sockets on {self.host}: {self._bind_error}")
        return self

    def publish(self, item: Message | Pending) -> bool:
        """Queue a telemetry item; returns False (and counts a drop) when the queue is full."""
        with self._lock:
            essential = item.type in ESSENTIAL_TYPES
            if not essential and self._telemetry_waiting >= self.queue_size:
                self.drops["telemetry"] += 1
                return False
            if not essential:
                self._telemetry_waiting += 1
            self._outbox.append(item)
            # essential messages go at once; telemetry waits for the next send_interval unless the queue fills up
            wake = (essential or self._telemetry_waiting * 2 >= self.queue_size) and not self._wake_pending
            self._wake_pending = self._wake_pending or wake
        if wake:
            self._wake()
        return True

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):  # full: the I/O thread has wakes to read already; closed: it has ended
            pass

    def poll_commands(self) -> list[dict[str, Any]]:
        """Every command received and validated since the last call: dicts with id, op, args."""
        commands = []
        while self._commands:
            commands.append(self._commands.popleft())
        return commands

    def send_ack(self, command: dict[str, Any], status: str, step: int | None = None, error: str | None = None,
                 result: dict[str, Any] | None = None) -> None:
        """Queue the final ack of a command: sent to its requester and published to every subscriber."""
        self.publish(Message("ack", ack(command, status, step=step, error=error, result=result)))

    def set_status(self, **fields: Any) -> None:
        """Update the heartbeat's fields; a change of ``state`` is published at once."""
        changed = "state" in fields and fields["state"] != self._status.get("state")
        self._status = {**self._status, **fields}
        if changed:
            self.publish(self._status_message())

    @property
    def queue_length(self) -> int:
        return len(self._outbox)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (waiting at most ``timeout`` s for in-flight copies), then close the sockets."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout + 1.0)

    # -- I/O thread ----------------------------------------------------------------------------------------------
    def _status_message(self) -> Message:
        body = {**self._status, "drops": self._drop_counts(),
                "queue": {"telemetry": self._telemetry_waiting, "recording": self._sink_queue()},
                "security": self.security()}
        errors = [str(sink.error) for sink in self.sinks if getattr(sink, "error", None)]
        if errors:
            body["recording_error"] = "; ".join(errors)[:1000]
        return Message("status", body)

    def security(self) -> dict[str, Any]:
        """``{"mode": "curve" | "none", "allowed": n, "denied": n, "accepted": n}`` (counts with CURVE only)."""
        if self.curve is None:
            return {"mode": "none"}
        auth = self.auth
        allowed = auth.certs.get(ZAP_DOMAIN, {}) if auth is not None else {}
        return {"mode": "curve", "allowed": len(allowed), "denied": auth.denied if auth else 0,
                "accepted": auth.accepted if auth else 0}

    def _start_auth(self, context: zmq.Context) -> _CountingAuthenticator:
        auth = _CountingAuthenticator(context, log=log.getChild("auth"))
        auth.start()
        self._reload_allowed(auth)
        return auth

    def _reload_allowed(self, auth: _CountingAuthenticator) -> None:
        """(Re)load the allow-list when its directory changed; never allows any client by default."""
        signature = self.curve.allowed_signature()
        if signature == self._allowed_signature:
            return
        self._allowed_signature = signature
        keys = self.curve.allowed_now()
        auth.allow_any = False
        auth.certs[ZAP_DOMAIN] = keys  # the ZAP thread reads this dict; a whole new dict replaces it atomically
        log.info("revacnn: %d client key(s) allowed to connect to run %s", len(keys), self.run_id)
        if not keys:
            log.warning("revacnn: CURVE is on but no client key is allowed yet: add one with `revacnn keys allow "
                        "CLIENT.key --keys-dir %s`", self.curve.allowed_dir.parent if self.curve.allowed_dir
                        else "DIR")

    def _drop_counts(self) -> dict[str, int]:
        drops = dict(self.drops)
        drops["recording"] = sum(int(getattr(sink, "drops", 0)) for sink in self.sinks)
        return drops

    def _sink_queue(self) -> int:
        return sum(int(getattr(sink, "queue_length", 0)) for sink in self.sinks)

    def _bind(self, context: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
        pub = context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, self.send_hwm)
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_BYTES)
        router.setsockopt(zmq.SNDHWM, 1000)
        router.setsockopt(zmq.RCVHWM, 1000)
        if self.curve is not None:
            for sock in (pub, router):
                sock.curve_secretkey = self.curve.secret
                sock.curve_publickey = self.curve.public
                sock.zap_domain = ZAP_DOMAIN.encode()
                sock.curve_server = True
        endpoints = []
        for sock, port in zip((pub, router), self._requested_ports):
            if port:
                sock.bind(f"tcp://{self.host}:{port}")
                endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            else:
                chosen = sock.bind_to_random_port(f"tcp://{self.host}")
                endpoints.append(f"tcp://{self.host}:{chosen}")
        self.telemetry_endpoint, self.control_endpoint = endpoints
        return pub, router

    def _run(self) -> None:
        context = zmq.Context()
        try:
            if self.curve is not None:
                self.auth = self._start_auth(context)  # before any bind: a CURVE socket without ZAP accepts anyone
            pub, router = self._bind(context)
        except BaseException as error:  # reported to start() in the training thread
            self._bind_error = error
            self._bound.set()
            if self.auth is not None:
                self.auth.stop()
            context.destroy(linger=0)
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_reader, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        deadline: float | None = None
        ready = {self._wake_reader.fileno(): zmq.POLLIN, router: zmq.POLLIN}  # look at both on the first pass
        try:
            while True:
                if self._stop.is_set() and deadline is None:
                    deadline = time.monotonic() + 5.0
                    self.set_status(state=final_state(self._status["state"]))
                # Only what the poll reported: most passes are the send_interval timer, and reading an empty
                # socket pair or polling the router again costs more than the pass's real work.
                if self._wake_reader.fileno() in ready:
                    self._clear_wakes()
                if router in ready:
                    for _ in range(100):
                        if not router.poll(0):
                            break
                        self._handle_safely(router, router.recv_multipart(copy=False))
                self._drain_outbox(pub, router, force=deadline is not None and time.monotonic() > deadline)
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + self.heartbeat_s
                    if self.auth is not None:
                        self._reload_allowed(self.auth)
                    self._send(pub, router, self._status_message())
                if deadline is not None and (not self._outbox or time.monotonic() > deadline):
                    break
                wake_at = min(next_heartbeat, deadline or next_heartbeat, time.monotonic() + self.send_interval)
                ready = dict(poller.poll(max(1, int(1000 * (wake_at - time.monotonic())))))
        except Exception:  # the I/O thread must never take training down; say what happened
            log.exception("revacnn I/O thread failed; telemetry and steering are off for this run")
        finally:
            pub.close(linger=200)
            router.close(linger=200)
            if self.auth is not None:
                self.auth.stop()
            context.term()
            self._wake_reader.close()
            self._wake_writer.close()

    def _clear_wakes(self) -> None:
        """Read every pending wake byte, then re-arm: a publish from here on (the outbox is drained after this)
        either is already in the outbox or sends a new byte."""
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            self._wake_pending = False

    def _drain_outbox(self, pub: zmq.Socket, router: zmq.Socket, force: bool = False) -> None:
        """Send every ready item at the head of the queue (at most 256 per call)."""
        sent = 0
        while self._outbox and sent < 256:
            item = self._outbox[0]
            if not isinstance(item, Message) and not item.ready() and not force:
                break
            self._outbox.popleft()
            if item.type not in ESSENTIAL_TYPES:
                with self._lock:
                    self._telemetry_waiting -= 1
            try:
                message = item if isinstance(item, Message) else item.resolve()
            except Exception:
                log.exception("revacnn could not resolve a %s message; dropped", item.type)
                self.drops["telemetry"] += 1
                continue
            self._send(pub, router, message)
            sent += 1

    def _send(self, pub: zmq.Socket, router: zmq.Socket, message: Message) -> None:
        frames = self.codec.encode(message)
        pub.send_multipart([TOPIC_PREFIX + message.type.encode(), *frames], copy=False)
        self.sent += 1
        key = "step_filters" if message.type == "step" and message.body.get("per_filter") else message.type
        if key in STATE_ORDER:
            self._state[key] = frames
            if key in STEP_KEYS:
                last = message.body.get("last" if key == "steps" else "step")
                self._state_step[key] = last if isinstance(last, int) else 0
            if key == "step_filters":
                self._state["step"] = frames
                self._state_step["step"] = self._state_step["step_filters"]
        if message.type == "ack":
            self._remember_ack(message.body)
            identity = self._identities.pop(message.body["id"], None)
            if identity is not None:
                router.send_multipart([identity, *self.control_codec.encode(Message("ack", dict(message.body)))])
        for sink in self.sinks:
            sink.submit(message)

    def _remember_ack(self, body: dict[str, Any]) -> None:
        self._acks[body["id"]] = body
        self._acks.move_to_end(body["id"])
        while len(self._acks) > MAX_REMEMBERED_ACKS:
            self._acks.popitem(last=False)

    def _reply(self, router: zmq.Socket, identity: bytes, message: Message) -> None:
        router.send_multipart([identity, *self.control_codec.encode(message)])

    def _handle_safely(self, router: zmq.Socket, frames: list) -> None:
        """Handle one request; a bug in handling it must not stop the I/O thread (it answers with an error)."""
        try:
            self._handle_request(router, frames)
        except zmq.ZMQError:
            raise
        except Exception as error:
            self.internal_errors += 1
            log.exception("revacnn: could not handle a control request")
            if frames:
                self._reply(router, bytes(frames[0].buffer), Message("error", error_body(
                    "", "internal", f"the trainer could not handle this request ({type(error).__name__})")))

    def _handle_request(self, router: zmq.Socket, frames: list) -> None:
        identity = bytes(frames[0].buffer)
        try:
            request = self.control_codec.decode(frames[1:])
            validate_request(request)
        except ProtocolError as error:
            self._reply(router, identity, Message("error", error_body("", error.code, error.detail)))
            return
        body = request.body
        req = body.get("req", "")
        if request.type == "hello":
            common = sorted(set(body["versions"]) & set(SUPPORTED_VERSIONS))
            if not common:
                detail = (f"client speaks versions {body['versions']}, this trainer speaks "
                          f"{list(SUPPORTED_VERSIONS)}; upgrade the older side")
                self._reply(router, identity, Message("error", error_body(req, "unsupported_version", detail)))
                return
            welcome = {"req": req, "version": common[-1], "run": self.run_id, "server": f"revacnn {__version__}",
                       "telemetry": self.telemetry_endpoint, "rank": 0,
                       "world_size": self._status.get("world_size", 1), "state_count": self._state_count()}
            self._reply(router, identity, Message("welcome", welcome))
            self._send_state(router, identity)
        elif request.type == "state":
            self._send_state(router, identity)
        else:
            self._accept_command(router, identity, body)

    def _state_count(self) -> int:
        keys = [key for key in STATE_ORDER if key in self._state]
        # "step" and "step_filters" can be the same message; it is sent once
        if "step" in keys and "step_filters" in keys and self._state["step"] is self._state["step_filters"]:
            keys.remove("step")
        return len(keys)

    def _send_state(self, router: zmq.Socket, identity: bytes) -> None:
        sent: list = []
        order = list(STATE_ORDER)
        first = order.index(STEP_KEYS[0])  # the step keys sit together in STATE_ORDER; put them in step order
        order[first:first + len(STEP_KEYS)] = sorted(STEP_KEYS, key=lambda key: self._state_step.get(key, 0))
        for key in order:
            frames = self._state.get(key)
            if frames is not None and not any(frames is other for other in sent):
                router.send_multipart([identity, *frames], copy=False)
                sent.append(frames)

    def _accept_command(self, router: zmq.Socket, identity: bytes, body: dict[str, Any]) -> None:
        command_id, op, args = command_envelope(body)  # checked by validate_request already
        command = {"req": body.get("req", ""), "id": command_id, "op": op, "args": args}
        previous = self._acks.get(command["id"])
        if previous is not None:  # a resend: answer again, never apply twice
            self._reply(router, identity, Message("ack", {**previous, "req": command["req"]}))
            return
        if len(self._commands) >= MAX_PENDING_COMMANDS:
            self._reply(router, identity, Message("ack", ack(
                command, ERROR, error=f"{MAX_PENDING_COMMANDS} commands are already waiting; try again later")))
            return
        queued = ack(command, QUEUED)
        self._remember_ack(queued)
        self._identities[command["id"]] = identity
        self._commands.append(command)
        self._reply(router, identity, Message("ack", queued))
