"""What the trainer says back: the ack of a command and the state of the run (docs/protocol.md). No torch.

An ack's ``status`` goes ``queued`` (the I/O thread accepted the command) → ``done`` | ``error`` (the training
thread applied or refused it). A run's ``state`` ends in one of ``TERMINAL_STATES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Ack statuses, in the order a command goes through them (``done`` and ``error`` are both final).
QUEUED, DONE, ERROR = "queued", "done", "error"
#: Run states of the ``status`` message.
STARTING, RUNNING, PAUSED, VALIDATING, STOPPING = "starting", "running", "paused", "validating", "stopping"
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"
#: The states a run ends in.
TERMINAL_STATES = (FINISHED, STOPPED, FAILED)


def ack(command: Mapping[str, Any], status: str, *, step: int | None = None, error: str | None = None,
        result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The body of the ack of ``command`` (a dict with ``id`` and, from the wire, ``req`` and ``op``)."""
    return {"req": command.get("req", ""), "id": command["id"], "op": command.get("op", ""), "status": status,
            "step": step, "error": error, "result": dict(result or {})}


def is_terminal(state: Any) -> bool:
    """True for a state a run ends in."""
    return state in TERMINAL_STATES


def final_state(state: Any) -> str:
    """The state a run reports when its I/O closes: the terminal state it reached, else ``finished``."""
    return state if is_terminal(state) else FINISHED


def initial_status() -> dict[str, Any]:
    """The heartbeat fields of a run before its first state change."""
    return {"state": STARTING, "step": 0, "epoch": 0, "world_size": 1, "message": ""}


def run_state(state: str, *, step: int, epoch: int, message: str = "") -> dict[str, Any]:
    """The fields of ``status`` that a change of the run's state sets."""
    return {"state": state, "step": step, "epoch": epoch, "message": message}
