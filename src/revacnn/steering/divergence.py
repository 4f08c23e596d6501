"""The divergence guard: notice a loss that diverged and rewind, pause or warn.

Rule (docs/steering.md, "Divergence guard"): a training batch's loss *diverged* when it is NaN or ±inf, or when it is
more than ``spike`` times the median of the last ``window`` finite losses (once ``min_history`` of them were seen
and that median is positive). The guard fires once per divergence: after firing it waits until its action was
applied (a rewind) or a loss is back within the rule (pause, warn).

The losses are read without waiting for the device: a CPU loss is read where it is; losses on an accelerator are
stacked every ``check_every`` batches and copied to pinned host memory without blocking, and read once the copy
has finished (a few batches later). Only global rank 0 watches; its decision reaches every rank as a command through
the DDP command broadcast, so all ranks rewind to the same point at the same step.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch

ACTIONS = ("rewind", "pause", "warn")


@dataclass(frozen=True)
class DivergenceRule:
    spike: float = 10.0
    window: int = 50
    min_history: int = 10
    check_every: int = 10


def batch_loss(outputs: Any) -> torch.Tensor | None:
    """The loss ``training_step`` returned (a tensor, or a dict's ``loss``), detached; None without one."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.detach().reshape(())
    return None


class DivergenceGuard:
    """Watches the losses of one run (global rank 0) and says when one diverged (``poll``)."""

    def __init__(self, action: str, rule: DivergenceRule = DivergenceRule()) -> None:
        if action not in ACTIONS:
            raise ValueError(f"on_divergence must be one of {', '.join(ACTIONS)} (or None), got {action!r}")
        self.action = action
        self.rule = rule
        self.recent: deque[float] = deque(maxlen=rule.window)
        self.fired = 0
        self._armed = True
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._in_flight: tuple[list[int], torch.Tensor, Any] | None = None
        self._rewound_to: set[int] = set()
        self._diverging = False

    def observe(self, step: int, loss: torch.Tensor | None) -> None:
        """A training batch's loss; ``step`` is the trainer's step after the batch (its row in the recording)."""
        if loss is not None and self._armed:
            self._pending.append((step, loss))

    def rearm(self) -> None:
        """The action was applied (the run rewound): judge the losses from here on, against a fresh history."""
        self._pending, self._in_flight = [], None
        self.recent.clear()
        self._armed, self._diverging = True, False

    def poll(self) -> dict[str, Any] | None:
        """The first diverged loss read since the last poll: ``{"step", "loss", "reason", "median"}``, or None."""
        for step, value in self._read():
            finite = math.isfinite(value)
            level = median(self.recent) if len(self.recent) >= self.rule.min_history else None
            if not finite:
                reason = "non-finite loss"
            elif level is not None and level > 0 and value > self.rule.spike * level:
                reason = f"loss above {self.rule.spike:g}× the median of the last {len(self.recent)} losses"
            else:
                self.recent.append(value)
                self._diverging = False
                continue
            if self._diverging:   # the same divergence still going on (pause, warn): said once
                continue
            self._diverging = True
            self.fired += 1
            self._armed = self.action != "rewind"   # pause and warn go on judging (``recent`` keeps the level)
            if self.action == "rewind":
                self._pending, self._in_flight = [], None
            return {"step": step, "loss": value if finite else None, "reason": reason,
                    "median": level, "action": self.action}
        return None

    def _read(self) -> list[tuple[int, float]]:
        """The losses whose values are on the host now, in order."""
        out: list[tuple[int, float]] = []
        if self._in_flight is not None:
            steps, host, done = self._in_flight
            if not done.query():
                return out
            out += list(zip(steps, host.tolist()))
            self._in_flight = None
        on_host = [(s, t) for s, t in self._pending if t.device.type == "cpu"]
        on_device = [(s, t) for s, t in self._pending if t.device.type != "cpu"]
        out += [(s, float(t.item())) for s, t in on_host]   # host memory: item() waits for no device
        self._pending = on_device
        if len(on_device) >= self.rule.check_every:
            values = torch.stack([t.float() for _, t in on_device])
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._in_flight = ([s for s, _ in on_device], host, done)
            self._pending = []
        return out

    def respond(self, info: dict[str, Any], history) -> dict[str, Any] | None:
        """The command the run gives itself for the divergence ``info`` (``poll``'s; updated with what is done):
        a ``rewind`` to the latest restore point before it (``history``: the run's ``RunHistory``, or None), a
        ``pause`` (asked for, or nothing to go back to, or the same point diverged again), or None (warn)."""
        command_id = f"divergence-{self.fired}"
        if info["action"] == "rewind":
            # the loss of the batch that ended at step s came from the state the batch started from, at step s - 1
            point = history.before_divergence(info["step"] - 1) if history is not None else None
            if point is not None and point.id not in self._rewound_to:
                self._rewound_to.add(point.id)
                info["restore_point"] = point.id
                return {"req": "", "id": command_id, "op": "rewind", "args": {"point": point.id},
                        "reason": "divergence", "divergence": info}
            info["action"] = "pause"
            info["why_not_rewind"] = ("diverged again after rewinding to restore point "
                                      f"{point.id}" if point is not None else "no restore point before it")
        if info["action"] == "pause":
            return {"req": "", "id": command_id, "op": "pause", "args": {}, "divergence": info}
        return None
