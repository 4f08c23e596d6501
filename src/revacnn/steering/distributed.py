"""Steering under DDP: every rank applies the same commands at the same step (rank 0 broadcasts what it received),
and the DDP wrapper follows a change of shapes."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class CommandBroadcast:
    """Rank 0's commands, handed to every rank at the steps a broadcast is due (held in between)."""

    def __init__(self) -> None:
        self._held: list[dict[str, Any]] = []

    def exchange(self, trainer: pl.Trainer, commands: list[dict[str, Any]], due: bool = True) -> list[dict[str, Any]]:
        """The commands to apply now, the same list on every rank."""
        if trainer.world_size == 1:
            return commands
        if not due:
            # Nothing is applied between broadcasts: keep rank 0's commands for the next one.
            self._held += commands
            return []
        commands, self._held = self._held + commands, []
        return trainer.strategy.broadcast(commands, src=0)


def parameter_copy_holder(trainer: pl.Trainer) -> str | None:
    """Which callback of the run keeps its own copy of the model's parameters, keyed to their shapes, and what."""
    from pytorch_lightning.callbacks import ModelPruning, StochasticWeightAveraging

    for callback in trainer.callbacks:
        if isinstance(callback, StochasticWeightAveraging):
            return "the StochasticWeightAveraging callback keeps a running average of the model's weights"
        if isinstance(callback, ModelPruning):
            return "the ModelPruning callback keeps masks and original weights of the layers it prunes"
    return None


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Re-register parameters with DDP after shapes changed (resizing without it lets ranks silently diverge)."""
    for parameter in trainer.lightning_module.parameters():
        parameter.grad = None
    trainer.strategy.model = trainer.lightning_module
    trainer.strategy.configure_ddp()
