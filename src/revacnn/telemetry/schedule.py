"""When the callback measures: the cadence of each quantity (``Schedule``; planned by ``telemetry.budget`` unless the
user fixed it) and the optimizer step a batch belongs to under gradient accumulation (``StepWindow``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch


@dataclass
class Schedule:
    """When each quantity is measured, in optimizer steps (0 turns a quantity off). The overhead budget changes the
    cadences the user did not fix while the run trains."""

    scalars_every: int = 1
    filters_every: int = 50
    snapshot_every: int = 500

    def as_plan(self) -> dict[str, int]:
        return {"scalars_every": self.scalars_every, "filters_every": self.filters_every,
                "snapshot_every": self.snapshot_every}

    def follow(self, plan: dict[str, int]) -> None:
        self.scalars_every, self.filters_every, self.snapshot_every = (
            plan["scalars_every"], plan["filters_every"], plan["snapshot_every"])

    def due(self, previous: int, step: int, every: int) -> bool:
        """Whether the optimizer steps after ``previous`` up to ``step`` include step 1 (the first) or a multiple of
        ``every``. One batch makes several steps when the module steps several optimizers (Lightning counts each)."""
        return every > 0 and step > previous and (previous < 1 <= step or step // every > previous // every)


class StepWindow:
    """The batches of one optimizer step (several under gradient accumulation) and the loss they returned."""

    def __init__(self) -> None:
        self.batch_start_step = 0          # trainer.global_step when this batch started
        self.steps_per_batch = 1           # optimizer steps the last batch that stepped made
        self.starts = True                 # the next batch starts a step (no gradient accumulated)
        self._loss: torch.Tensor | None = None   # sum of the losses Lightning returned in this step
        self._batches = 0

    def batch_ended(self, step: int) -> bool:
        """Note a batch's end at ``step``; whether it made an optimizer step (else its gradient is accumulated for
        the next batch's)."""
        stepped = step != self.batch_start_step
        self.starts = stepped
        if stepped:
            self.steps_per_batch = step - self.batch_start_step
        return stepped

    def add_batch_loss(self, outputs: Any) -> None:
        """Add the loss a batch returned to its step's sum (on the device: no sync)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            self._loss = loss if self._loss is None else self._loss + loss
            self._batches += 1

    def step_loss(self, trainer: pl.Trainer) -> torch.Tensor | None:
        """The step's training loss: the mean over its batches of the loss each one returned.

        Under automatic optimization Lightning hands each batch's loss on divided by ``accumulate_grad_batches``
        (what it back-propagates), also in a last, shorter accumulation of an epoch; this undoes that.
        """
        total, count = self._loss, self._batches
        self._loss, self._batches = None, 0
        if total is None:
            return None
        divided_by = trainer.accumulate_grad_batches if trainer.lightning_module.automatic_optimization else 1
        return total if divided_by == count else total * (divided_by / count)
