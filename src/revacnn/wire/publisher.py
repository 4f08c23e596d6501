"""The trainer's I/O thread: owns the telemetry PUB and control ROUTER sockets. No torch.

The training thread only appends to an in-memory queue (``publish``, ``send_ack``) and drains validated commands
(``poll_commands``); it never touches a socket and never waits. Telemetry items may still be in flight on the
device (``PendingMessage``): the I/O thread resolves them once their copy to host has finished, in order.
Requests on the control socket are answered by ``revacnn.wire.control.ControlDesk``; who may connect is
``revacnn.wire.curve_auth``'s business.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

import zmq

from revacnn import __version__
from revacnn.wire.acks import ack, final_state, initial_status
from revacnn.wire.connection import CurveServerKeys, bare_host, is_ipv6_literal, tcp_endpoint
from revacnn.wire.control import CONTROL_MAX_BYTES, ControlDesk, ControlLimits
from revacnn.wire.curve_auth import CurveGuard, is_loopback
from revacnn.wire.ledger import CpuLedger, thread_cpu
from revacnn.wire.protocol import REQUEST_LIMITS, TOPIC_PREFIX, Codec, Message

__all__ = ["ESSENTIAL_TYPES", "Pending", "Publisher", "Sink", "is_loopback"]

log = logging.getLogger(__name__)

#: Types that are never dropped when the queue is full (low volume, and a client cannot do without them).
ESSENTIAL_TYPES = frozenset({"structure", "hparams", "status", "ack"})


class Pending(Protocol):
    """A telemetry message whose arrays are still being copied from the device."""

    type: str

    def ready(self) -> bool: ...

    def resolve(self) -> Message: ...


class Sink(Protocol):
    """Receives every resolved message (the run recorder). ``submit`` must not block."""

    def submit(self, message: Message) -> bool: ...


class Publisher:
    """Background thread owning every socket of a run.

    ``queue_size`` bounds the telemetry items waiting for the thread; when it is full, new telemetry is dropped and
    counted (``drops``). Structure, hyper-parameter, status and ack messages are never dropped; they are sent at once,
    telemetry every ``send_interval`` seconds (or as soon as half the queue is waiting).

    ``curve`` (``CurveServerKeys``) turns on CURVE encryption and authentication on both sockets: only clients whose
    public key is in the allow-list complete the handshake; others receive nothing and cannot send anything. A
    ZAP authenticator thread runs in this publisher's own ZeroMQ context. The allow-list directory is re-read when
    its files change. Without CURVE a non-loopback ``host`` is refused unless ``insecure_bind=True``.

    ``control_limits`` (``ControlLimits``) sets the per-client request rate and how many final acks a second are
    published on telemetry (docs/protocol.md §5).
    """

    def __init__(self, run_id: str, host: str = "127.0.0.1", telemetry_port: int = 0, control_port: int = 0,
                 key: bytes | None = None, send_hwm: int = 100, queue_size: int = 64, heartbeat_s: float = 1.0,
                 send_interval: float = 0.05,
                 sinks: Iterable[Sink] = (), insecure_bind: bool = False,
                 curve: CurveServerKeys | None = None, control_limits: ControlLimits | None = None) -> None:
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
        self.host = bare_host(host)   # "[::1]" and "::1" alike; endpoints put the brackets back
        self.curve = curve
        self.guard = CurveGuard(curve, run_id)
        # One codec per socket, as each numbers its own messages (docs/protocol.md): a reply on the control socket
        # must not take a number from the telemetry stream, where a client counts every missing number as a drop.
        self.codec = Codec(run_id, key)
        # the control socket decodes requests only: the tight limits of docs/protocol.md §5
        requests = Codec(run_id, key, max_buffers=64, max_bytes=CONTROL_MAX_BYTES, limits=REQUEST_LIMITS)
        self.desk = ControlDesk(requests, self._welcome, control_limits)
        self.send_hwm = send_hwm
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.send_interval = send_interval
        self.sinks = list(sinks)
        self.telemetry_endpoint = ""
        self.control_endpoint = ""
        self._telemetry_bound = ""  # what the PUB socket bound, as libzmq names it (for unbind)
        self.drops = {"telemetry": 0}
        self.sent = 0
        self._requested_ports = (telemetry_port, control_port)
        self._outbox: collections.deque = collections.deque()
        self._telemetry_waiting = 0
        self._lock = threading.Lock()
        self._commands = self.desk.commands  # filled by the I/O thread, drained by poll_commands
        self._status: dict[str, Any] = initial_status()
        #: (global step, epoch) as of the last batch: set by the training thread every batch (one tuple, no lock,
        #: no device sync), read by the heartbeat so that its step is current between state changes.
        self.progress: tuple[int, int] | None = None
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
        self.ledger = CpuLedger()   # the I/O thread's CPU by message type (for the callback's overhead budget)
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
        if "step" in fields and "epoch" in fields:
            self.progress = (fields["step"], fields["epoch"])
        if changed:
            self.publish(self._status_message())

    @property
    def queue_length(self) -> int:
        return len(self._outbox)

    @property
    def ledgers(self) -> list[CpuLedger]:
        """What the background threads spent on each message type: the I/O thread's and its sinks' (the
        recorder's)."""
        return [self.ledger, *(ledger for sink in self.sinks
                               if isinstance(ledger := getattr(sink, "ledger", None), CpuLedger))]

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (waiting at most ``timeout`` s for in-flight copies), then close the sockets."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout + 1.0)

    # -- I/O thread ----------------------------------------------------------------------------------------------
    def _status_message(self) -> Message:
        progress = self.progress
        step = {"step": progress[0], "epoch": progress[1]} if progress is not None else {}
        body = {**self._status, **step, "drops": self._drop_counts(), "control": self.desk.counts(),
                "queue": {"telemetry": self._telemetry_waiting, "recording": self._sink_queue()},
                "security": self.security()}
        errors = [str(sink.error) for sink in self.sinks if getattr(sink, "error", None)]
        if errors:
            body["recording_error"] = "; ".join(errors)[:1000]
        disks = [sink.disk_status for sink in self.sinks if getattr(sink, "disk_status", None)]
        if disks:                       # the recording's disk budget (revacnn.recording.budget)
            body["disk"] = disks[0]
        return Message("status", body)

    def security(self) -> dict[str, Any]:
        """``{"mode": "curve" | "none", "allowed": n, "denied": n, "accepted": n}`` (counts with CURVE only)."""
        return self.guard.security()

    @property
    def internal_errors(self) -> int:
        """Control requests whose handling failed with a bug (each was answered with an ``internal`` error)."""
        return self.desk.internal_errors

    def _welcome(self) -> dict[str, Any]:
        return {"run": self.run_id, "server": f"revacnn {__version__}", "telemetry": self.telemetry_endpoint,
                "rank": 0, "world_size": self._status.get("world_size", 1)}

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
        for sock in (pub, router):
            if is_ipv6_literal(self.host):  # without it libzmq refuses an IPv6 address ("No such device")
                sock.setsockopt(zmq.IPV6, 1)
            self.guard.secure(sock)
        endpoints = []
        for sock, port in zip((pub, router), self._requested_ports):
            if port:
                sock.bind(tcp_endpoint(self.host, port))
                endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            else:
                chosen = sock.bind_to_random_port(tcp_endpoint(self.host))
                endpoints.append(tcp_endpoint(self.host, chosen))
        self.telemetry_endpoint, self.control_endpoint = endpoints
        self._telemetry_bound = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        return pub, router

    def _rebind_telemetry(self, pub: zmq.Socket) -> None:
        """Drop every telemetry subscriber by unbinding the PUB socket and binding the same endpoint again: each
        reconnects and handshakes anew, and ZAP refuses the keys revoked since (a subscription is never checked
        again once open). Subscribers miss what is published meanwhile (sequence numbers show the gap)."""
        pub.unbind(self._telemetry_bound)
        for attempt in range(50):
            try:
                pub.bind(self._telemetry_bound)
                break
            except zmq.ZMQError as error:  # the old listener may still hold the port for a moment
                if error.errno != zmq.EADDRINUSE or attempt == 49:
                    log.error("revacnn: could not bind the telemetry of run %s again on %s (%s); telemetry is "
                              "off for this run, steering goes on", self.run_id, self._telemetry_bound, error)
                    return
                time.sleep(0.01)
        log.info("revacnn: telemetry of run %s rebound on %s so every subscriber's key is checked again",
                 self.run_id, self._telemetry_bound)

    def _run(self) -> None:
        context = zmq.Context()
        try:
            self.guard.start(context)  # before any bind: a CURVE socket without ZAP accepts anyone
            pub, router = self._bind(context)
        except BaseException as error:  # reported to start() in the training thread
            self._bind_error = error
            self._bound.set()
            self.guard.stop()
            context.destroy(linger=0)
            return
        self._bound.set()
        try:
            self._serve(pub, router)
        except Exception:  # the I/O thread must never take training down; say what happened
            log.exception("revacnn I/O thread failed; telemetry and steering are off for this run")
        finally:
            pub.close(linger=200)
            router.close(linger=200)
            self.guard.stop()
            context.term()
            self._wake_reader.close()
            self._wake_writer.close()

    def _serve(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        """The I/O loop: requests, the outbox and the heartbeat, until close() and the outbox is sent (or 5 s)."""
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_reader, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        deadline: float | None = None
        ready = {self._wake_reader.fileno(): zmq.POLLIN, router: zmq.POLLIN}  # look at both on the first pass
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
                    frames = router.recv_multipart(copy=False)
                    if self.guard.admits(frames):  # a key revoked since it connected is ignored
                        self.desk.handle_safely(router, frames)
            self._drain_outbox(pub, router, force=deadline is not None and time.monotonic() > deadline)
            if time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + self.heartbeat_s
                if self.guard.reload():  # a key was revoked: make every subscriber handshake again
                    self._rebind_telemetry(pub)
                self._send(pub, router, self._status_message())
            if deadline is not None and (not self._outbox or time.monotonic() > deadline):
                return
            wake_at = min(next_heartbeat, deadline or next_heartbeat, time.monotonic() + self.send_interval)
            ready = dict(poller.poll(max(1, int(1000 * (wake_at - time.monotonic())))))

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
            start = thread_cpu()
            try:
                message = item if isinstance(item, Message) else item.resolve()
            except Exception:
                log.exception("revacnn could not resolve a %s message; dropped", item.type)
                self.drops["telemetry"] += 1
                continue
            self._send(pub, router, message)
            self.ledger.charge(message.type, thread_cpu() - start)
            sent += 1

    def _send(self, pub: zmq.Socket, router: zmq.Socket, message: Message) -> None:
        frames = None
        if message.type != "ack" or self.desk.may_publish_ack():  # else: to its requester only (no seq taken)
            frames = self.codec.encode(message)
            pub.send_multipart([TOPIC_PREFIX + message.type.encode(), *frames], copy=False)
            self.sent += 1
        elif not message.time:
            message.time = time.time()
        self.desk.sent(router, message, frames)
        for sink in self.sinks:
            sink.submit(message)
