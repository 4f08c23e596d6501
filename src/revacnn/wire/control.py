"""The control socket's side of the I/O thread: requests in, replies out (docs/protocol.md §3). No torch.

``ControlDesk`` answers ``hello`` (welcome + state snapshot), ``state`` (the snapshot) and ``command`` (a ``queued``
ack, or the earlier ack of a resent command); it keeps the latest message of each state type for late joiners and
routes a command's final ack back to whoever sent it. It runs on the I/O thread only, except ``commands``, a deque
that the training thread drains.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import zmq

from revacnn.wire.acks import ERROR, QUEUED, ack
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
CONTROL_MAX_BYTES = 1 << 20
MAX_PENDING_COMMANDS = 1000
MAX_REMEMBERED_ACKS = 10_000


class ControlDesk:
    """Handles the requests of the control ROUTER socket for one run.

    ``welcome`` returns the fields of a ``welcome`` reply that belong to the run (run, server, telemetry endpoint,
    rank, world size); the desk adds ``req``, ``version`` and ``state_count``.
    """

    def __init__(self, codec: Codec, welcome: Callable[[], dict[str, Any]]) -> None:
        self.codec = codec
        self.welcome = welcome
        self.commands: collections.deque = collections.deque()
        self.internal_errors = 0
        self._acks: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._identities: dict[str, bytes] = {}
        self._state: dict[str, list] = {}
        self._state_step: dict[str, int] = {}    # the (last) step of each cached step message, to order them

    # -- what the telemetry socket sent ------------------------------------------------------------------------
    def sent(self, router: zmq.Socket, message: Message, frames: list) -> None:
        """Note a message sent on the telemetry socket: keep it for the state snapshot, and send an ack to the
        client that sent its command."""
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
                router.send_multipart([identity, *self.codec.encode(Message("ack", dict(message.body)))])

    def _remember_ack(self, body: dict[str, Any]) -> None:
        self._acks[body["id"]] = body
        self._acks.move_to_end(body["id"])
        while len(self._acks) > MAX_REMEMBERED_ACKS:
            self._acks.popitem(last=False)

    # -- requests ------------------------------------------------------------------------------------------------
    def handle_safely(self, router: zmq.Socket, frames: list) -> None:
        """Handle one request; a bug in handling it must not stop the I/O thread (it answers with an error)."""
        try:
            self._handle(router, frames)
        except zmq.ZMQError:
            raise
        except Exception as error:
            self.internal_errors += 1
            log.exception("revacnn: could not handle a control request")
            if frames:
                self._reply(router, bytes(frames[0].buffer), Message("error", error_body(
                    "", "internal", f"the trainer could not handle this request ({type(error).__name__})")))

    def _reply(self, router: zmq.Socket, identity: bytes, message: Message) -> None:
        router.send_multipart([identity, *self.codec.encode(message)])

    def _handle(self, router: zmq.Socket, frames: list) -> None:
        identity = bytes(frames[0].buffer)
        try:
            request = self.codec.decode(frames[1:])
            validate_request(request)
        except ProtocolError as error:
            self._reply(router, identity, Message("error", error_body("", error.code, error.detail)))
            return
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
        previous = self._acks.get(command_id)
        if previous is not None:  # a resend: answer again, never apply twice
            self._reply(router, identity, Message("ack", {**previous, "req": command["req"]}))
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
