"""The control socket's side of the I/O thread: requests in, replies out (docs/protocol.md §3). No torch.

``ControlDesk`` answers ``hello`` (welcome + state snapshot), ``state`` (the snapshot) and ``command`` (a ``queued``
ack, or the earlier ack of a resent command); it keeps the latest message of each state type for late joiners and
routes a command's final ack back to whoever sent it. It runs on the I/O thread only, except ``commands``, a deque
that the training thread drains.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from revacnn.wire.acks import DONE, ERROR, QUEUED, ack
from revacnn.wire.protocol import (
    SUPPORTED_VERSIONS,
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
# The latest snapshot is kept for late joiners only up to this size: a ResNet-50's (~190 MB of weights and
# gradients) would otherwise stay in the trainer's memory for the whole run. A joiner reads larger ones from the
# recording or asks for a fresh one with the ``snapshot`` command.
MAX_STATE_SNAPSHOT_BYTES = 64 << 20
CONTROL_MAX_BYTES = 1 << 20
MAX_PENDING_COMMANDS = 1000
#: The full acks kept to answer a re-sent command with the ack it got; older ids keep only their status, op and step.
MAX_REMEMBERED_ACKS = 10_000
#: Clients whose rate-limit bucket is kept; beyond, the least recently heard from is forgotten (it starts full again).
MAX_CLIENTS = 4096
#: A request costs one rate-limit token, plus one for every this many bytes it has: big requests cost the I/O thread
#: more (up to ~20 ms for 1 MiB), so a client sending them gets fewer.
BYTES_PER_TOKEN = 16 * 1024
#: Seconds between two log lines about internal errors; the ones in between are counted and said in the next line.
INTERNAL_ERROR_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class ControlLimits:
    """How much one client may ask of the control socket, and how many acks go out on telemetry (docs/protocol.md
    §5). ``requests_per_s`` with bursts of ``request_burst`` per client (per CURVE key where CURVE is on, else per
    connection; a request counts once, plus once per ``BYTES_PER_TOKEN`` bytes); more are dropped unread and
    counted, and the first one each second is answered ``rate_limited``.
    Final acks are published on telemetry at ``acks_per_s`` (bursts of ``ack_burst``); the rest reach only their
    requester (and the recording) and are counted."""

    requests_per_s: float = 100.0
    request_burst: int = 200
    acks_per_s: float = 20.0
    ack_burst: int = 40


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; ``take`` spends ``cost`` of them when there are."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.refused_at = -1e18  # when this client was last told it is rate-limited

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class ThrottledLog:
    """``log.exception`` at most once every ``interval`` seconds; the suppressed ones are counted in the next line
    (a client that finds a bug must not be able to fill the trainer's log)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -1e18
        self.suppressed = 0

    def exception(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            text += f" ({self.suppressed} more since the last such line were not logged)"
        self.last, self.suppressed = now, 0
        log.exception(text)


def frames_bytes(frames: list) -> int:
    """The bytes of a message's encoded frames (bytes, buffers or ``zmq.Frame``s)."""
    return sum(len(frame.buffer) if isinstance(frame, zmq.Frame) else memoryview(frame).nbytes for frame in frames)


class ControlDesk:
    """Handles the requests of the control ROUTER socket for one run.

    ``welcome`` returns the fields of a ``welcome`` reply that belong to the run (run, server, telemetry endpoint,
    rank, world size); the desk adds ``req``, ``version`` and ``state_count``.
    """

    def __init__(self, codec: Codec, welcome: Callable[[], dict[str, Any]],
                 limits: ControlLimits | None = None) -> None:
        self.codec = codec
        self.welcome = welcome
        self.limits = limits or ControlLimits()
        self.commands: collections.deque = collections.deque()
        self.internal_errors = 0
        self.rate_limited = 0       # requests dropped by the per-client rate limit
        self.acks_unpublished = 0   # final acks sent only to their requester, over the telemetry ack rate
        self._req = ""              # the req of the request being handled, once decoded (echoed by an internal error)
        self._error_log = ThrottledLog(INTERNAL_ERROR_LOG_INTERVAL)
        self._buckets: collections.OrderedDict[bytes, TokenBucket] = collections.OrderedDict()
        self._ack_bucket = TokenBucket(self.limits.acks_per_s, self.limits.ack_burst)
        self._acks: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        # every command id of the run → (status, op, step) of its latest ack: an id is never applied twice, however
        # many commands came after it (an id is at most 64 characters; the rate limit bounds how fast this grows)
        self._seen: dict[str, tuple[str, str, int | None]] = {}
        self._identities: dict[str, bytes] = {}
        self._state: dict[str, list] = {}
        self._state_step: dict[str, int] = {}    # the (last) step of each cached step message, to order them

    def counts(self) -> dict[str, int]:
        """The ``control`` field of ``status``: requests dropped by the rate limit, acks not published."""
        return {"rate_limited": self.rate_limited, "acks_unpublished": self.acks_unpublished}

    # -- what the telemetry socket sent ------------------------------------------------------------------------
    def may_publish_ack(self) -> bool:
        """Whether a final ack goes out on telemetry too (at most ``acks_per_s``): a command flood must not push
        other watchers' telemetry out of their queues. Its requester gets it on the control socket either way."""
        if self._ack_bucket.take(time.monotonic()):
            return True
        self.acks_unpublished += 1
        return False

    def sent(self, router: zmq.Socket, message: Message, frames: list | None) -> None:
        """Note a message sent on the telemetry socket (``frames`` None: an ack not published): keep it for the
        state snapshot, and send an ack to the client that sent its command."""
        key = "step_filters" if message.type == "step" and message.body.get("per_filter") else message.type
        if key == "snapshot" and frames is not None and frames_bytes(frames) > MAX_STATE_SNAPSHOT_BYTES:
            self._state.pop(key, None)   # an older one kept would be shown as the latest
            frames = None
        if key in STATE_ORDER and frames is not None:
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
                router.send_multipart([identity, *self.codec.encode(Message("ack", dict(message.body)))])

    def _remember_ack(self, body: dict[str, Any]) -> None:
        self._seen[body["id"]] = (body["status"], body.get("op", ""), body.get("step"))
        self._acks[body["id"]] = body
        self._acks.move_to_end(body["id"])
        while len(self._acks) > MAX_REMEMBERED_ACKS:
            self._acks.popitem(last=False)

    def _earlier_ack(self, command: dict[str, Any]) -> dict[str, Any] | None:
        """The ack to answer a re-sent command with: the one it got, or, where that is no longer kept, one built
        from its status, op and step that says so; None for an id not seen in this run."""
        previous = self._acks.get(command["id"])
        if previous is not None:
            return {**previous, "req": command["req"]}
        seen = self._seen.get(command["id"])
        if seen is None:
            return None
        status, op, step = seen
        error = None
        if status == ERROR:
            error = (f"command {command['id']!r} was refused earlier in this run (at step {step}); it is not "
                     "applied again, and its full ack is no longer kept")
        result = {"already_applied": True} if status == DONE else {}
        return {**ack({**command, "op": op}, status, step=step, error=error), "result": result}

    # -- requests ------------------------------------------------------------------------------------------------
    def handle_safely(self, router: zmq.Socket, frames: list) -> None:
        """Handle one request; a bug in handling it must not stop the I/O thread (it answers with an error, and
        says so in the log at most once a minute)."""
        self._req = ""
        try:
            if self._within_rate(router, frames):
                self._handle(router, frames)
        except zmq.ZMQError:
            raise
        except Exception as error:
            self.internal_errors += 1
            self._error_log.exception("revacnn: could not handle a control request")
            if frames:
                self._reply(router, bytes(frames[0].buffer), Message("error", error_body(
                    self._req, "internal", f"the trainer could not handle this request ({type(error).__name__})")))

    def _within_rate(self, router: zmq.Socket, frames: list) -> bool:
        """Take a token from the sender's bucket; without one the request is dropped unread (and counted), and the
        first such request each second is answered ``rate_limited``."""
        client = self._client(frames)
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self.limits.requests_per_s, self.limits.request_burst)
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        now = time.monotonic()
        size = sum(len(frame) for frame in frames[1:])
        if bucket.take(now, min(1 + size // BYTES_PER_TOKEN, bucket.burst)):
            return True
        self.rate_limited += 1
        if now - bucket.refused_at >= 1.0:
            bucket.refused_at = now
            limits = self.limits
            self._reply(router, bytes(frames[0].buffer), Message("error", error_body("", "rate_limited", (
                f"this client sent more than {limits.requests_per_s:g} requests/s (bursts of "
                f"{limits.request_burst}): this request was dropped unread, and so are the others this client sends "
                "before a token is free again, without a reply for the next second"))))
        return False

    @staticmethod
    def _client(frames: list) -> bytes:
        """Who a request counts against: its CURVE key (User-Id) where there is one — a client cannot get a fresh
        bucket by reconnecting — else its ROUTER identity."""
        try:
            user = frames[-1].get("User-Id") if len(frames) > 1 else None
        except (zmq.ZMQError, AttributeError, TypeError):
            user = None
        return b"user:" + user.encode() if user else bytes(frames[0].buffer)

    def _reply(self, router: zmq.Socket, identity: bytes, message: Message) -> None:
        router.send_multipart([identity, *self.codec.encode(message)])

    def _handle(self, router: zmq.Socket, frames: list) -> None:
        identity = bytes(frames[0].buffer)
        try:
            request = self.codec.decode(frames[1:])
            validate_request(request)
        except ProtocolError as error:
            self._reply(router, identity, Message("error", error_body(error.req, error.code, error.detail)))
            return
        self._req = request.body.get("req", "")
        if request.type == "hello":
            self._hello(router, identity, request.body)
        elif request.type == "state":
            self._send_state(router, identity)
        else:
            self._accept_command(router, identity, request.body)

    def _hello(self, router: zmq.Socket, identity: bytes, body: dict[str, Any]) -> None:
        req = body.get("req", "")
        common = sorted(set(body["versions"]) & set(SUPPORTED_VERSIONS))
        if not common:
            detail = (f"client speaks versions {body['versions']}, this trainer speaks "
                      f"{list(SUPPORTED_VERSIONS)}; upgrade the older side")
            self._reply(router, identity, Message("error", error_body(req, "unsupported_version", detail)))
            return
        welcome = {"req": req, "version": common[-1], **self.welcome(), "state_count": self._state_count()}
        self._reply(router, identity, Message("welcome", welcome))
        self._send_state(router, identity)

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
        command_id, op, args = command_envelope(body)  # validate_request checked it already
        command = {"req": body.get("req", ""), "id": command_id, "op": op, "args": args}
        previous = self._earlier_ack(command)
        if previous is not None:  # a resend: answer again, never apply twice
            self._reply(router, identity, Message("ack", previous))
            return
        if len(self.commands) >= MAX_PENDING_COMMANDS:
            self._reply(router, identity, Message("ack", ack(
                command, ERROR, error=f"{MAX_PENDING_COMMANDS} commands are already waiting; try again later")))
            return
        queued = ack(command, QUEUED)
        self._remember_ack(queued)
        self._identities[command_id] = identity
        self.commands.append(command)
        self._reply(router, identity, Message("ack", queued))
