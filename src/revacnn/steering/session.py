"""One run's steering as an object, on every rank: the commands it receives and applies at the safe point before a
batch, and what it does about a loss that diverged.

Commands come from rank 0's ROUTER socket, from the run itself (a failed recording with ``on_recording_error="stop"``;
the divergence guard's ``rewind`` or ``pause``) and reach every rank through the DDP command broadcast
(``steering.distributed``). Each is applied by what owns it — the loop's own by ``steering.loop``, ``undo`` and
``rewind`` by ``steering.rewind``, the rest by the steering engine — and answered with one ack. A restore point is
taken before every changing command and dropped again when the command is refused (nothing changed); after new
parameter objects (a change of shapes, a restore point put back) the DDP wrapper, compiled graphs and the monitored
layers follow. The callback's hooks only call in here (``ReVACNNCallback``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from revacnn.telemetry.probes import discover_layers
from revacnn.telemetry.validation import first_batch_tensors
from revacnn.wire.acks import DONE, ERROR
from revacnn.wire.ops import CHANGING_OPS, FREEZE_OPS, HISTORY_OPS, LOOP_OPS, SET_HPARAMS, STRUCTURAL_OPS

from .distributed import CommandBroadcast, parameter_copy_holder, rewrap_ddp
from .divergence import DivergenceGuard, batch_loss
from .engine import SteeringEngine
from .errors import SteeringError
from .loop import Ack, LoopControl
from .restore import RestorePoint
from .rewind import RunHistory

if TYPE_CHECKING:
    from revacnn.checkpoint import ModelHistory
    from revacnn.options import SteeringOptions
    from revacnn.run import Run
    from revacnn.telemetry.schedule import StepWindow
    from revacnn.telemetry.session import Telemetry


class SteeringSession:
    """The steering of one run (one ``fit``): its loop state, engine, restore points and divergence guard."""

    def __init__(self, options: SteeringOptions, run: Run, telemetry: Telemetry, history: ModelHistory,
                 window: StepWindow, layer_selectors: list[Any] | None,
                 set_state: Callable[[str, pl.Trainer], None]) -> None:
        self.options = options
        self.run, self.telemetry, self.history, self.window = run, telemetry, history, window
        self.layer_selectors = layer_selectors
        self.set_state = set_state                  # the callback's: flushes the steps, then publishes the state
        self.loop = LoopControl()
        self.engine: SteeringEngine | None = None   # made at the first command, or when a frozen set comes back
        self.rewinds: RunHistory | None = None      # restore points, undo, rewind; from the training's start
        self.guard = None if options.on_divergence is None else DivergenceGuard(options.on_divergence)
        self._broadcast = CommandBroadcast()
        self._guard_commands: list[dict[str, Any]] = []   # what the divergence guard asked for, to broadcast

    def acknowledger(self, trainer: pl.Trainer) -> Ack:
        """``ack(command, status, error=None, result=None)``: answer a command at the trainer's step."""
        return lambda command, status, **details: self.run.ack(command, status, trainer, **details)

    # -- the run's start and end --------------------------------------------------------------------------------
    def start(self, trainer: pl.Trainer) -> None:
        """Keep restore points from the training's start (rank 0 spills them into the run directory)."""
        if self.options.enabled and self.options.restore_points is not None:
            run_dir = self.run.run_dir
            spill = run_dir / "restore_points" if trainer.is_global_zero and run_dir else None
            self.rewinds = RunHistory(self.options.restore_points, spill)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()  # removes its optimizer step hooks
            self.engine = None
        if self.rewinds is not None:
            self.rewinds.close()
            self.rewinds = None

    def epoch_started(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Acknowledge a batch size the epoch starts with; whether it changed (the hyper-parameters to publish)."""
        return self.loop.epoch_started(trainer, pl_module, self.acknowledger(trainer))

    def fit_ended(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Answer a batch size no epoch started with (the run ended first): every command gets a final ack."""
        self.loop.fit_ended(pl_module, self.acknowledger(trainer))

    # -- before and after each batch ----------------------------------------------------------------------------
    def steer(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Apply the commands due now (while paused, those that come until the run resumes or stops), then take a
        periodic restore point if one is due. Nothing when steering is off."""
        if not self.options.enabled:
            return
        due = self.options.commands_due(trainer.world_size, trainer.global_step)
        for command in self._receive(trainer, due):
            self.apply(trainer, pl_module, batch, command)
        while self.loop.paused and not trainer.should_stop:
            time.sleep(0.05)
            for command in self._receive(trainer):
                self.apply(trainer, pl_module, batch, command)
        if self.rewinds is not None:   # (no engine yet: nothing was frozen; one is made at the first command)
            self.rewinds.periodic(trainer, pl_module, self.engine, self.history)

    def watch_divergence(self, trainer: pl.Trainer, outputs: Any) -> None:
        """Give the divergence guard this batch's loss (global rank 0); when it fires, publish the event and queue
        its command for the next broadcast."""
        if self.guard is None:
            return
        self.guard.observe(trainer.global_step, batch_loss(outputs))
        info = self.guard.poll()
        if info is None:
            return
        command = self.guard.respond(info, self.rewinds)
        rank_zero_warn(f"revacnn: divergence at step {info['step']} ({info['reason']}, loss {info['loss']}): "
                       f"{info['action']}" + (f" to restore point {info['restore_point']}"
                                              if "restore_point" in info else ""))
        if self.run.publisher is not None:
            self.run.publisher.set_status(divergence={**info, "count": self.guard.fired})
        if command is not None:
            self._guard_commands.append(command)

    def restore_frozen(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Freeze again what was frozen when the checkpoint was saved (or the module's last fit ended), before the
        first optimizer step: a frozen layer must not train again because the run resumed."""
        state, self.history.frozen_to_restore = self.history.frozen_to_restore, None
        skipped = self.engine_for(trainer, pl_module, batch).freezer.load_state(state)
        if skipped:
            rank_zero_warn(f"revacnn: could not freeze again {', '.join(skipped)}: not in the model")
        rank_zero_info(f"revacnn: froze again {len(state.get('layers') or {})} layer(s) and the filters of "
                       f"{len(state.get('filters') or {})} layer(s) that were frozen before")
        if self.run.publisher is not None:
            self.telemetry.guarded(lambda: self.telemetry.publish_structure(pl_module))  # the frozen marks changed

    # -- one command --------------------------------------------------------------------------------------------
    def _receive(self, trainer: pl.Trainer, due: bool = True) -> list[dict[str, Any]]:
        """Commands to apply now, the same list on every rank (rank 0 broadcasts what it received)."""
        publisher = self.run.publisher
        commands = publisher.poll_commands() if publisher is not None else []
        stop = self.run.recording_stop(self.options.on_recording_error)
        if stop is not None:
            commands.append(stop)
        commands += self._guard_commands
        self._guard_commands = []
        return self._broadcast.exchange(trainer, commands, due)

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, command: dict[str, Any]) -> None:
        """Apply one command and answer it, or refuse it having changed nothing."""
        op = command.get("op")
        if "divergence" in command and self.guard is not None:   # the guard's own command: judge afresh after it
            self.guard.rearm()
        if op in LOOP_OPS:
            self._apply_loop_op(trainer, pl_module, batch, command)
            return
        holder = parameter_copy_holder(trainer) if op in STRUCTURAL_OPS else None
        if holder is not None:  # refused before anything changes, on every rank alike
            self.acknowledger(trainer)(command, ERROR, error=f"{op}: {holder}, which cannot follow a change of "
                                       "shapes (the run would fail at its next use); train without it to change the "
                                       "network's structure")
            return
        engine = self.engine_for(trainer, pl_module, batch)
        if op in HISTORY_OPS:
            self._go_back(trainer, pl_module, command, engine)
        else:
            self._apply_engine_op(trainer, pl_module, batch, command, engine)

    def _point_before(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                      command: dict[str, Any]) -> RestorePoint | None:
        """The restore point taken before a changing command (``rewind {"point": …}`` takes the command back);
        None for one that changes nothing, or with restore points off."""
        if self.rewinds is None or command.get("op") not in CHANGING_OPS:
            return None
        engine = self.engine_for(trainer, pl_module, batch)
        return self.rewinds.before_command(trainer, pl_module, command, engine, self.history)

    def _apply_loop_op(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                       command: dict[str, Any]) -> None:
        point = self._point_before(trainer, pl_module, batch, command)   # set_batch_size changes the run
        ack, refused = self.acknowledger(trainer), []

        def loop_ack(answered: dict[str, Any], status: str, **details: Any) -> None:
            if answered is command and status == ERROR:
                refused.append(answered)
            ack(answered, status, **details)

        self.loop.apply(trainer, pl_module, command, loop_ack, lambda state: self.set_state(state, trainer))
        if point is not None and refused:
            self.rewinds.discard(point)

    def _apply_engine_op(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                         command: dict[str, Any], engine: SteeringEngine) -> None:
        op, ack = command.get("op"), self.acknowledger(trainer)
        point = self._point_before(trainer, pl_module, batch, command)
        result = engine.apply({"id": command["id"], "op": op, "args": command.get("args", {})})
        if not result.get("ok"):
            if point is not None:
                self.rewinds.discard(point)
            ack(command, ERROR, error=result.get("error") or "the steering engine refused it")
            return
        if result.get("structural"):   # filter ids follow, and what reads the old parameters
            self.history.follow(result, renamed_too=[self.telemetry.snapshots.previous])
            self.follow_new_parameters(trainer, pl_module)
        elif op in FREEZE_OPS:
            self.telemetry.guarded(lambda: self.telemetry.publish_structure(pl_module))  # the frozen marks changed
        if op == SET_HPARAMS:
            self.telemetry.guarded(lambda: self.telemetry.publish_hparams(trainer))
        done = {key: value for key, value in result.items() if key not in ("id", "op", "ok", "error")}
        done["revision"] = self.history.revision
        if point is not None:
            done["restore_point"] = point.id
        ack(command, DONE, result=done)

    def _go_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, command: dict[str, Any],
                 engine: SteeringEngine) -> None:
        """``undo`` or ``rewind``: restore a point, then follow it as a change of structure (``steering.rewind``)."""
        ack = self.acknowledger(trainer)
        if self.rewinds is None:
            ack(command, ERROR, error=f"{command.get('op')}: restore points are off (restore_points=None)")
            return
        self.telemetry.guarded(lambda: self.telemetry.steps.flush(trainer))  # the old branch's steps come first
        try:
            result = self.rewinds.apply(trainer, pl_module, command, engine, self.history, self.loop, ack)
        except SteeringError as error:
            ack(command, ERROR, error=str(error))
            return
        self.window.batch_start_step = trainer.global_step
        self.follow_new_parameters(trainer, pl_module)
        if "divergence" in command:
            result["divergence"] = command["divergence"]
        ack(command, DONE, result={**result, "revision": self.history.revision})

    # -- what follows the model's parameters --------------------------------------------------------------------
    def engine_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> SteeringEngine:
        """The steering engine, made at its first use; its example input is a probe image or two of ``batch``."""
        if self.engine is None:
            tensors = first_batch_tensors(batch)
            probe_batch = self.telemetry.images.probe_batch
            example = (probe_batch[0] if probe_batch is not None
                       else tensors[0][:2] if tensors is not None else None)
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            self.engine = SteeringEngine(pl_module, list(trainer.optimizers), schedulers, example_input=example,
                                         distributed=trainer.world_size > 1)
            self.engine.changelog = self.history.changelog
        return self.engine

    def follow_new_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Follow new parameter objects (a change of shapes, a restore point put back): the DDP wrapper, compiled
        graphs, the monitored layers, and a new structure."""
        if trainer.world_size > 1:
            rewrap_ddp(trainer)
        if hasattr(torch, "compiler"):
            torch.compiler.reset()
        self.telemetry.layers_changed(discover_layers(pl_module, self.layer_selectors))
        if self.run.publisher is not None:
            self.telemetry.guarded(lambda: self.telemetry.publish_structure(pl_module))
            self.telemetry.guarded(lambda: self.telemetry.publish_hparams(trainer))
