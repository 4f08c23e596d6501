"""The commands the training loop applies itself, not the steering engine: pause, resume, stop, snapshot and
set_batch_size (acknowledged when the next epoch starts with the new size)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from revacnn.telemetry.messages import loader_batch_size


#: ``ack(command, status, error=None, result=None)``
Ack = Callable[..., None]


class LoopControl:
    """The loop's state under steering: paused, a snapshot asked for, a batch size waiting for its epoch."""

    def __init__(self) -> None:
        self.paused = False
        self.snapshot_requested = False
        # (command, new size, the attribute's value before it)
        self._pending_batch_size: tuple[dict[str, Any], int, Any] | None = None
        self._batch_size_applied: tuple[dict[str, Any], int, Any] | None = None
        self._reload_loader = False   # a restore point put a different batch size back

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, command: dict[str, Any],
              ack: Ack, set_state: Callable[[str], None]) -> None:
        op, args = command.get("op"), command.get("args", {})
        unexpected = sorted(set(args) - ({"batch_size"} if op == "set_batch_size" else set()))
        if unexpected:
            ack(command, "error", error=f"{op} takes no argument(s) {', '.join(unexpected)}")
            return
        if op == "pause":
            self.paused = True
            set_state("paused")
        elif op == "resume":
            self.paused = False
            set_state("running")
        elif op == "stop":
            self.paused = False
            trainer.should_stop = True
            set_state("stopping")
        elif op == "snapshot":
            self.snapshot_requested = True
        elif op == "set_batch_size":
            self._set_batch_size(pl_module, command, args, ack)
            return
        ack(command, "done")

    def _set_batch_size(self, pl_module: pl.LightningModule, command: dict[str, Any], args: dict[str, Any],
                        ack: Ack) -> None:
        from pytorch_lightning.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr

        size = args.get("batch_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            ack(command, "error", error=f"batch_size must be an integer ≥ 1, got {size!r}")
            return
        if not lightning_hasattr(pl_module, "batch_size"):
            ack(command, "error", error="neither the LightningModule, its hparams nor the datamodule has a "
                                        "'batch_size' attribute to change")
            return
        before = lightning_getattr(pl_module, "batch_size")
        if self._pending_batch_size is not None:  # the later request wins; the earlier one never takes effect
            earlier, _, before = self._pending_batch_size  # put back, if need be, to the size before either
            ack(earlier, "error", error=f"set_batch_size: superseded by command {command.get('id')} before it took "
                                        "effect")
        lightning_setattr(pl_module, "batch_size", size)
        self._pending_batch_size = (command, size, before)  # acknowledged when the next epoch starts with it

    def put_back_batch_size(self, pl_module: pl.LightningModule, size: Any, ack: Ack) -> None:
        """A restore point was restored: its ``batch_size`` attribute comes back (the loader follows at the next
        epoch, as with set_batch_size) and a set_batch_size still waiting for its epoch is taken back."""
        from pytorch_lightning.utilities.parsing import lightning_getattr, lightning_setattr

        for waiting in (self._pending_batch_size, self._batch_size_applied):
            if waiting is not None:
                ack(waiting[0], "error", error="set_batch_size: taken back by undo/rewind before an epoch started "
                                               "with it")
        self._pending_batch_size = self._batch_size_applied = None
        if lightning_getattr(pl_module, "batch_size") != size:
            lightning_setattr(pl_module, "batch_size", size)
            self._reload_loader = True

    def epoch_ended(self, trainer: pl.Trainer) -> None:
        if self._reload_loader and self._pending_batch_size is None:
            trainer.fit_loop._combined_loader = None
            self._reload_loader = False
        if self._pending_batch_size is not None:
            # The train iterator is made once per epoch: drop the loader so the next epoch builds one anew.
            trainer.fit_loop._combined_loader = None
            self._batch_size_applied, self._pending_batch_size = self._pending_batch_size, None

    def fit_ended(self, pl_module: pl.LightningModule, ack: Ack) -> None:
        """Answer a batch size that no epoch started with (the run ended first), and put the attribute back: a
        command refused changes nothing, and a later ``fit`` must not pick it up unannounced."""
        waiting = self._pending_batch_size or self._batch_size_applied
        self._pending_batch_size = self._batch_size_applied = None
        if waiting is None:
            return
        from pytorch_lightning.utilities.parsing import lightning_setattr

        command, _, before = waiting
        lightning_setattr(pl_module, "batch_size", before)
        ack(command, "error", error=f"set_batch_size: training ended before an epoch started with it; the "
                                    f"'batch_size' attribute is back at {before!r}")

    def epoch_started(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ack: Ack) -> bool:
        """Acknowledge a batch size the epoch starts with; whether it changed (the hyper-parameters to publish)."""
        if self._batch_size_applied is None:
            return False
        command, size, before = self._batch_size_applied
        self._batch_size_applied = None
        loaded = loader_batch_size(trainer)  # 0: not readable (a batch sampler, several loaders)
        if loaded and loaded != size:  # a train_dataloader() that does not read the attribute: put it back
            from pytorch_lightning.utilities.parsing import lightning_setattr

            lightning_setattr(pl_module, "batch_size", before)
            ack(command, "error", error=f"set_batch_size: the training loader rebuilt for epoch "
                f"{trainer.current_epoch} still has batch size {loaded}: train_dataloader() does not read "
                f"the 'batch_size' attribute, which is back at {before!r}")
            return False
        ack(command, "done", result={"batch_size": size, "epoch": trainer.current_epoch})
        return True
