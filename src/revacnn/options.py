"""The arguments of ``ReVACNNCallback``, checked when the callback is made (a wrong one raises ``ValueError`` at
construction, not when ``fit`` starts) and bundled for the part of the run that uses them: what telemetry measures
and how often (``TelemetryOptions``) and how the run steers (``SteeringOptions``). How a run publishes and records
is ``run.Transport``, which checks the recording's disk arguments itself; ``RestorePolicy`` checks its own fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from revacnn.steering.divergence import ACTIONS
from revacnn.steering.restore_store import RestorePolicy

#: the cadence of each quantity when neither the user nor the overhead budget chose one
DEFAULT_CADENCES = {"scalars_every": 1, "filters_every": 50, "snapshot_every": 500}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TelemetryOptions:
    """What rank 0 measures and how often (the callback's arguments of the same names)."""

    budget: float | None
    scalars_every: int | None
    filters_every: int | None
    snapshot_every: int | None
    activation_images: int | None
    probe_images: int
    val_subset: int
    max_activation_bytes: int

    def __post_init__(self) -> None:
        given = {name: value for name, value in self.cadences().items() if value is not None}
        for name, value in (*given.items(), ("probe_images", self.probe_images), ("val_subset", self.val_subset)):
            if not _is_count(value):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        budget = self.budget
        if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                                   or not 0 < budget < 1):
            raise ValueError(f"budget must be a fraction of training time in (0, 1) such as 0.02, or None, "
                             f"got {budget!r}")
        images = self.activation_images
        if images is not None and (not isinstance(images, int) or isinstance(images, bool) or images < 1):
            raise ValueError(f"activation_images must be a positive integer or None, got {images!r}")

    def cadences(self) -> dict[str, int | None]:
        """The cadences as given (None: the budget chooses it)."""
        return {"scalars_every": self.scalars_every, "filters_every": self.filters_every,
                "snapshot_every": self.snapshot_every}

    def initial_plan(self) -> dict[str, int]:
        """The schedule a run starts from: the given cadences, the defaults for the others."""
        return {name: DEFAULT_CADENCES[name] if value is None else value for name, value in self.cadences().items()}

    def fixed_cadences(self) -> set[str]:
        """The cadences the overhead budget leaves as they are: those given, and the scalars' always (every step's
        loss is charted and recorded; their cost is taken from the budget first)."""
        return {"scalars_every"} | {name for name, value in self.cadences().items() if value is not None}


@dataclass(frozen=True)
class SteeringOptions:
    """How the run steers (the callback's arguments ``steering``, ``command_every``, ``restore_points``,
    ``on_divergence`` and ``on_recording_error``: a failed recording stops the run through the command broadcast)."""

    enabled: bool
    command_every: int
    restore_points: RestorePolicy | None
    on_divergence: str | None
    on_recording_error: str

    def __post_init__(self) -> None:
        if self.on_recording_error not in ("warn", "stop"):
            raise ValueError(f"on_recording_error must be 'warn' or 'stop', got {self.on_recording_error!r}")
        if self.on_divergence is not None and self.on_divergence not in ACTIONS:
            raise ValueError(f"on_divergence must be 'rewind', 'pause', 'warn' or None, got {self.on_divergence!r}")
        if self.command_every < 1:
            raise ValueError(f"command_every must be ≥ 1, got {self.command_every!r}")

    def commands_due(self, world_size: int, step: int) -> bool:
        """Whether rank 0's commands are broadcast at this step (without DDP: before every batch)."""
        return world_size == 1 or step % self.command_every == 0
