"""``ReVACNNCallback``: watch and steer a Lightning run while it trains.

Hooks stay thin and delegate: what is due comes from ``telemetry.schedule``; ``telemetry.session`` measures
(``telemetry.probes``) and publishes (``telemetry.messages``, ``telemetry.snapshot``: one packed host copy each,
handed to the I/O thread of ``wire.publisher``); the run's directory, publisher, recorder and state are ``run``'s,
the change log in checkpoints ``checkpoint``'s, and steering commands are applied at the safe point before each
batch (``steering.loop`` for the loop's own, ``steering.distributed`` for DDP, the engine for the rest). Only global
rank 0 measures, publishes and records; every rank takes part in the command broadcast so that all of them steer
identically at the same step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from revacnn.checkpoint import CheckpointHooks, ModelHistory, changelog_entry, has_lazy_parameters
from revacnn.recording.budget import disk_options
from revacnn.run import Run, Transport
from revacnn.steering.distributed import CommandBroadcast, parameter_copy_holder, rewrap_ddp
from revacnn.steering.divergence import DivergenceGuard, batch_loss
from revacnn.steering.loop import LoopControl
from revacnn.telemetry.budget import OverheadBudget
from revacnn.telemetry.messages import validated_run_name
from revacnn.steering.restore_store import RestorePolicy
from revacnn.telemetry.probes import discover_layers
from revacnn.telemetry.schedule import Schedule, StepWindow
from revacnn.telemetry.session import Telemetry
from revacnn.telemetry.validation import first_batch_tensors
from revacnn.wire.acks import DONE, ERROR
from revacnn.wire.ops import CHANGING_OPS, FREEZE_OPS, HISTORY_OPS, LOOP_OPS, SET_HPARAMS, STRUCTURAL_OPS

__all__ = ["ReVACNNCallback", "RestorePolicy", "Schedule"]


class ReVACNNCallback(Callback):
    """Publish per-filter telemetry over ZeroMQ, record the run, and apply steering commands between batches.

    Args:
        layers: monitored layers, as module names or types (default: every Conv2d and Linear).
        name: the run's name as the dashboard shows it, e.g. ``"baseline lr 0.1"`` (printable, at most 100
            characters; sent in the ``structure`` message and written to the recording's run.json).
        budget: the most the callback may cost, as a fraction of training time (default 0.02: training keeps ≥ 98 %
            of its speed). The callback measures what each quantity costs on this run — per-filter data,
            snapshots, per-step scalars, its background threads — and chooses how often to measure each so that
            together they stay within it, refreshing per-filter data as close to the dashboard's 2 Hz as the budget
            allows; the cadence and the measured cost are in the heartbeat (``schedule``) and on the dashboard
            (docs/telemetry.md, "Budget"). ``None``: no budget, the ``*_every`` defaults below are fixed.
        scalars_every: publish step scalars (loss, logged metrics, lr, samples/s) every this many optimizer steps
            (0 = off). Default: every step (the budget never thins them; their cost is taken from it first).
        filters_every: publish per-filter gradients, weight norms, update ratios and mean |activation| every this
            many optimizer steps (0 = off). Default: chosen by the budget (50 without one). Given, it is fixed.
        snapshot_every: publish full weights, gradients, DeepTracker statistics and probe activation maps every
            this many optimizer steps (0 = off). Default: chosen by the budget, at most one every 5 s (500 without
            one). Given, it is fixed.
        activation_images: the mean |activation| of each filter (ReVACNN's path strength, defined on an input image)
            is measured on the first this many images of each measured batch (default 16; ``None``: all of them),
            so its cost does not grow with the batch size.
        probe_images: validation images kept for activation maps (chosen once, kept for the whole run).
        val_subset: validation images whose predictions are published after each validation (DeepTracker's
            image × iteration view).
        max_activation_bytes: the most probe activation maps (with their gradients) one snapshot carries; layers
            past it are left out and named in the snapshot's ``probe_skipped``.
        host: the address both sockets bind (127.0.0.1 by default; see ``insecure_bind``).
        telemetry_port: the PUB socket's port (0: a free port, written to the connection file).
        control_port: the ROUTER socket's port for commands and snapshot requests (0: a free port).
        run_dir: where the recording and the connection file go (default: ``<trainer.log_dir>/revacnn``, or
            ``revacnn-2``, ``-3``, … where a run was recorded before). Each ``fit`` is a run of its own.
        record: write the run to ``run_dir`` (see revacnn.recording).
        sign: sign every message with a per-run HMAC key kept in the connection file (mode 0600).
        steering: accept steering commands.
        command_every: under DDP, how often (in optimizer steps) rank 0 broadcasts received commands to the other
            ranks (default 10: the broadcast is a collective that syncs the host with NCCL, so not every step; a
            command waits at most that many steps). Without DDP commands apply before the next batch.
        queue_size: bound of the telemetry queue between the training thread and the sending thread (messages
            past it are dropped and counted).
        send_hwm: bound of ZeroMQ's queue per subscriber (a subscriber that stops reading loses messages, never
            slows training).
        insecure_bind: allow a non-loopback ``host`` without CURVE (anyone who reaches it can read and steer).
        curve: CURVE encryption and authentication of both sockets (docs/remote.md), with the keys in
            ``$REVACNN_KEYS_DIR`` or ``~/.revacnn/keys`` unless ``keys_dir`` is given.
        keys_dir: holds the trainer's keypair (``server.key_secret``, made when missing) and ``allowed/``, the
            public keys of the clients that may connect (``revacnn keys allow``); giving it turns CURVE on. The
            connection file then carries the trainer's public key, never its secret.
        on_recording_error: ``"warn"`` (default: warn once, keep training, the recording stops) or ``"stop"``
            (end ``fit`` gracefully, on every rank, at the next batch after the recording failed).
        restore_points: when restore points are taken (before every changing command, and every
            ``RestorePolicy.every_steps``) and how many are kept in memory and on disk; ``None``: none (``undo`` and
            ``rewind`` are then refused). See docs/steering.md, "Undo and rewind".
        on_divergence: the divergence guard (off by default): ``"rewind"`` (go back to the latest restore point
            before the loss diverged), ``"pause"`` or ``"warn"``, when the loss is NaN/inf or far above its recent
            level (``steering.divergence``; the rule is in docs/steering.md).
        disk_budget: the most the run directory holds (bytes, or e.g. ``"1GB"``, ``"500MB"``; None: no budget).
            Past it, older snapshots go first, then per-filter data gets coarser, then stops being written (never
            the scalars); run.json and the heartbeat's ``disk`` say what was dropped (docs/design.md, "Disk budget").
        disk_min_free: free space the recording never goes below on its filesystem, whatever the budget.
        snapshot_keep: snapshot retention: None (keep all while the budget allows, then drop all but the 3 most
            recent and log-spaced older ones first), an int n (keep the n most recent), or a callable given the
            snapshot steps on disk that returns those to keep.
        snapshot_dtype: how recorded snapshots store weights, gradients and activation maps: ``"float32"``
            (exact), ``"float16"`` or ``"bfloat16"`` (half the bytes; read back as float32, see docs/design.md).
    """

    def __init__(self, layers: Iterable[str | type[nn.Module]] | None = None, *, name: str | None = None,
                 budget: float | None = 0.02,
                 scalars_every: int | None = None, filters_every: int | None = None,
                 snapshot_every: int | None = None, activation_images: int | None = 16, probe_images: int = 8,
                 val_subset: int = 1000,
                 max_activation_bytes: int = 64 << 20, host: str = "127.0.0.1", telemetry_port: int = 0,
                 control_port: int = 0, run_dir: str | os.PathLike | None = None, record: bool = True,
                 sign: bool = False, steering: bool = True, command_every: int = 10, queue_size: int = 64,
                 send_hwm: int = 100, insecure_bind: bool = False, curve: bool = False,
                 keys_dir: str | os.PathLike | None = None, on_recording_error: str = "warn",
                 restore_points: RestorePolicy | None = RestorePolicy(), on_divergence: str | None = None,
                 # -- the recording's disk (revacnn.recording.budget) --
                 disk_budget: int | str | None = "1GB", disk_min_free: int | str | None = "1GB",
                 snapshot_keep: int | Callable[[list[int]], Iterable[int]] | None = None,
                 snapshot_dtype: str = "float32") -> None:
        super().__init__()
        self.run_name = validated_run_name(name)
        self.recording_options = {"disk_budget": disk_budget, "disk_min_free": disk_min_free,
                                  "snapshot_keep": snapshot_keep, "snapshot_dtype": snapshot_dtype}
        disk_options(disk_budget, disk_min_free, snapshot_keep, snapshot_dtype)     # ValueError now, not at fit
        if on_recording_error not in ("warn", "stop"):
            raise ValueError(f"on_recording_error must be 'warn' or 'stop', got {on_recording_error!r}")
        cadences = {"scalars_every": scalars_every, "filters_every": filters_every, "snapshot_every": snapshot_every}
        for name, value in (*((name, value) for name, value in cadences.items() if value is not None),
                            ("probe_images", probe_images), ("val_subset", val_subset)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                                   or not 0 < budget < 1):
            raise ValueError(f"budget must be a fraction of training time in (0, 1) such as 0.02, or None, "
                             f"got {budget!r}")
        if activation_images is not None and (not isinstance(activation_images, int)
                                              or isinstance(activation_images, bool) or activation_images < 1):
            raise ValueError(f"activation_images must be a positive integer or None, got {activation_images!r}")
        if on_divergence is not None and on_divergence not in ("rewind", "pause", "warn"):
            raise ValueError(f"on_divergence must be 'rewind', 'pause', 'warn' or None, got {on_divergence!r}")
        if command_every < 1:
            raise ValueError(f"command_every must be ≥ 1, got {command_every!r}")
        self.layer_selectors = list(layers) if layers is not None else None
        self.budget = budget
        # scalars are never thinned by the budget: every step's loss is charted and recorded; their cost comes first
        self.fixed_cadences = {"scalars_every"} | {name for name, value in cadences.items() if value is not None}
        self._initial_plan = {name: value if value is not None else default
                              for (name, value), default in zip(cadences.items(), (1, 50, 500))}
        self.activation_images = activation_images
        self.probe_images = probe_images
        self.val_subset = val_subset
        self.max_activation_bytes = max_activation_bytes
        self.host, self.telemetry_port, self.control_port = host, telemetry_port, control_port
        self.record = record
        self.on_recording_error = on_recording_error
        self.sign = sign
        self.steering = steering
        self.command_every = command_every
        self.queue_size, self.send_hwm = queue_size, send_hwm
        self.insecure_bind = insecure_bind
        self.curve = bool(curve) or keys_dir is not None
        self.keys_dir = keys_dir
        self.restore_points = restore_points
        self.on_divergence = on_divergence

        self.history = ModelHistory()   # kept from one fit to the next: a checkpoint must replay every change
        self._checkpoint_hooks = CheckpointHooks()
        self._run_dir_given = Path(run_dir) if run_dir is not None else None
        self._fits = 0
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What belongs to one run (one ``fit``): a second fit with this callback records a new run."""
        self._run = Run(self._run_dir_given)
        self.engine = None
        self._frozen_at_end: dict[str, Any] | None = None   # the engine's frozen set when the fit ended
        self.schedule = Schedule(**self._initial_plan)
        budget = OverheadBudget(self.budget, self.schedule.as_plan(), self.fixed_cadences)
        self.telemetry = Telemetry(self.schedule, budget, self.max_activation_bytes, self.history, self._frozen_layers,
                                   self.activation_images, run_name=self.run_name)
        self._window = StepWindow()
        self._loop = LoopControl()
        self._commands = CommandBroadcast()
        self._probe_armed = False                            # the probe's state while a validation runs
        self._awaiting_shapes = False                        # lazy layers: telemetry starts after the first batch
        self.rewinds = None                                  # restore points, undo, rewind (``steering.rewind``)
        self._guard = None if self.on_divergence is None else DivergenceGuard(self.on_divergence)
        self._guard_commands: list[dict[str, Any]] = []       # what the divergence guard asked for, to broadcast

    # -- what the run and its telemetry hold, under the callback's names -----------------------------------------
    run_id = property(lambda self: self._run.run_id)
    run_dir = property(lambda self: self._run.run_dir)
    publisher = property(lambda self: self._run.publisher)
    recorder = property(lambda self: self._run.recorder)
    connection_file = property(lambda self: self._run.connection_file)
    paused = property(lambda self: self._loop.paused)
    _state = property(lambda self: self._run.state)
    probe = property(lambda self: self.telemetry.probe)
    changelog = property(lambda self: self.history.changelog)   # docs/steering.md: kept next to a saved model
    filter_ids = property(lambda self: self.history.filter_ids)
    next_filter_id = property(lambda self: self.history.next_filter_id)
    revision = property(lambda self: self.history.revision)

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        return self.telemetry.layers

    # -- Lightning state ----------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layer_selectors and [str(s) for s in self.layer_selectors])

    def state_dict(self) -> dict[str, Any]:
        return self.history.state_dict(self.run_id)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["revacnn"] = changelog_entry(self.history.changelog, self.run_id, self._frozen_state())

    def _frozen_state(self) -> dict[str, Any]:
        """What ``freeze`` froze, for checkpoints: the engine's, or what waits to be frozen again (a checkpoint saved
        before the first batch of a resumed fit)."""
        if self.engine is not None:
            return self.engine.freezer.state()
        return self.history.frozen_to_restore or self._frozen_at_end or {"layers": {}, "filters": {}}

    # -- set-up and tear-down -----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._fits:  # this callback recorded a run before: this fit is a new run, in a directory of its own
            self._reset_run_state()
        self._fits += 1
        self._checkpoint_hooks.wrap(pl_module, self.history, lambda checkpoint: self.on_save_checkpoint(
            pl_module.trainer, pl_module, checkpoint))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The run opens here, not in ``setup``: a Tuner's trial fit (``lr_find``, ``scale_batch_size``) ends inside
        # the finder's ``on_fit_start``, before this one, and must not leave an empty run behind.
        # On every rank: ``Trainer.log_dir`` is a collective (rank 0 broadcasts it); asked on rank 0 alone it hung.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir) if self.run_dir is None else None
        if trainer.is_global_zero:
            transport = Transport(self.host, self.telemetry_port, self.control_port, self.record, self.sign,
                                  self.send_hwm, self.queue_size, self.insecure_bind, self.curve, self.keys_dir,
                                  self.recording_options)
            self.telemetry.attach(self._run.open(trainer, log_dir, transport))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window.starts = True
        self.telemetry.layers = discover_layers(pl_module, self.layer_selectors)
        # Lazy layers (LazyConv2d, LazyLinear) get their shapes in the first forward: telemetry and steering start
        # after it, so the model is initialised by the training batch as it would be without this callback.
        self._awaiting_shapes = has_lazy_parameters(pl_module)  # on every rank: steering follows it
        if self._awaiting_shapes:
            rank_zero_info("revacnn: the model has lazy layers; telemetry and steering start once the first batch has "
                           "given them their shapes")
        if self.steering and self.restore_points is not None:
            from revacnn.steering.rewind import RunHistory

            spill = self.run_dir / "restore_points" if trainer.is_global_zero and self.run_dir else None
            self.rewinds = RunHistory(self.restore_points, spill)
        if trainer.is_global_zero:
            if trainer.ckpt_path:
                # Known here, not in ``on_fit_start``: Lightning restores the loops' state in between.
                self._run.announce_resume(trainer, self.history.resumed_run)
            if not self._awaiting_shapes:
                self._telemetry(trainer, lambda: self._start_telemetry(trainer, pl_module))
            self._set_state("running", trainer)

    def _start_telemetry(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.telemetry.start(trainer, pl_module, self.layer_selectors, self.probe_images, self.val_subset)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop.fit_ended(pl_module, self._acknowledger(trainer))  # every command gets a final ack
        self._set_state("stopped" if trainer.should_stop and self._state == "stopping" else "finished", trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            if isinstance(exception, KeyboardInterrupt):  # Ctrl-C: the user stopped the run
                self._set_state("stopped", trainer, message="interrupted (KeyboardInterrupt)")
            else:
                self._set_state("failed", trainer, message=f"{type(exception).__name__}: {exception}")
        except Exception as error:  # never hide the run's own exception behind one of ours
            rank_zero_warn(f"revacnn: could not publish the run's end: {type(error).__name__}: {error}")
        # Lightning calls no ``teardown`` after an exception or a Ctrl-C: close here, or the last steps and this
        # state never reach the dashboard and the recording (the process exits with its threads mid-work).
        self._close(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close(trainer)

    def _close(self, trainer: pl.Trainer) -> None:
        """Undo what ``setup`` and ``on_train_start`` did, and send and write what is queued; idempotent."""
        self._frozen_at_end = self._frozen_state()   # for a checkpoint saved after the fit
        self._checkpoint_hooks.unwrap(self.history.changelog, self.run_id, self._frozen_at_end)
        self.history.frozen_to_restore = None   # the module keeps it (``SavesChangelog``), for its next fit
        self.telemetry.close(trainer)
        if self.engine is not None:
            self.engine.close()  # removes its optimizer step hooks
            self.engine = None
        if self.rewinds is not None:
            self.rewinds.close()
            self.rewinds = None
        self._run.close()

    # -- every batch --------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._window.batch_start_step = step = trainer.global_step  # this batch makes the steps after it
        if self.history.frozen_to_restore and not self._awaiting_shapes:
            self._restore_frozen(trainer, pl_module, batch)
        if self.steering and self._window.starts and not self._awaiting_shapes:  # never inside one accumulated step
            self._steer(trainer, pl_module, batch)
            if self.rewinds is not None:   # (no engine yet: nothing was frozen; one is made at the first command)
                self.rewinds.periodic(trainer, pl_module, self.engine, self.history)
            step = self._window.batch_start_step = trainer.global_step   # an undo or rewind moved it
        if (self.probe is not None and self._window.starts
                and self.schedule.due(step, step + self._window.steps_per_batch, self.schedule.filters_every)):
            self.probe.arm()  # until the step's measure: every batch of an accumulated gradient
        tensors = first_batch_tensors(batch)
        if tensors is not None:
            self.telemetry.steps.batch_size = int(tensors[0].shape[0])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.probe is None or not self.probe.armed:
            return
        if len(trainer.optimizers) == 1:
            self._telemetry(trainer, self.telemetry.measure)
        else:  # each layer as its own optimizer steps it; measured at the batch's end, once every optimizer has
            self._telemetry(trainer, lambda: self.probe.hold(optimizer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._awaiting_shapes:  # the first forward has given the lazy layers their shapes
            self._awaiting_shapes = False
            if trainer.is_global_zero:
                self._telemetry(trainer, lambda: self._start_telemetry(trainer, pl_module))
        if self._guard is not None and trainer.is_global_zero:
            self._watch_divergence(trainer, outputs)
        previous = self._window.batch_start_step
        stepped = self._window.batch_ended(trainer.global_step)  # on every rank: steering follows it
        if stepped and self.probe is not None and self.probe.holding:  # several optimizers stepped this batch
            self._telemetry(trainer, self.telemetry.measure)
        if self.publisher is not None:
            self.publisher.progress = (trainer.global_step, trainer.current_epoch)  # the heartbeat's; plain ints
            self._telemetry(trainer, lambda: self._publish_batch(trainer, pl_module, outputs, batch_idx, previous))

    def _publish_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch_idx: int,
                       previous: int) -> None:
        if self.telemetry.publish_batch(trainer, pl_module, self._window, outputs, batch_idx, previous,
                                        self._loop.snapshot_requested):
            self._loop.snapshot_requested = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._telemetry(trainer, lambda: self.telemetry.steps.flush(trainer))
        self._loop.epoch_ended(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loop.epoch_started(trainer, pl_module, self._acknowledger(trainer)):
            self._telemetry(trainer, lambda: self._publish_hparams(trainer))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:  # a validation between accumulated batches is not the training's activation
            self._probe_armed, self.probe.armed = self.probe.armed, False
        self.telemetry.validation_started(trainer)
        if not trainer.sanity_checking and self._state == "running":
            self._set_state("validating", trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:
            self.probe.armed = self._probe_armed
        if trainer.sanity_checking or self.publisher is None:
            return
        if self._state == "validating":
            self._set_state("running", trainer)
        self._telemetry(trainer, lambda: self._publish_validation(trainer, pl_module))

    # -- publishing (``Telemetry``'s; a test replaces ``_publish_validation`` on the class) ---------------------
    def _publish_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.telemetry.publish_validation(trainer, pl_module)

    def _publish_structure(self, pl_module: pl.LightningModule) -> None:
        self.telemetry.publish_structure(pl_module)

    def _publish_hparams(self, trainer: pl.Trainer) -> None:
        self.telemetry.publish_hparams(trainer)

    def _set_state(self, state: str, trainer: pl.Trainer, message: str = "") -> None:
        self.telemetry.steps.flush(trainer)  # a paused, stopped or failed run shows every step it took
        self._run.set_state(state, trainer, message)

    # -- steering -----------------------------------------------------------------------------------------------
    def _receive_commands(self, trainer: pl.Trainer, due: bool = True) -> list[dict[str, Any]]:
        """Commands to apply now, the same list on every rank (rank 0 broadcasts what it received)."""
        commands = self.publisher.poll_commands() if self.publisher is not None else []
        stop = self._run.recording_stop(self.on_recording_error)
        if stop is not None:
            commands.append(stop)
        commands += self._guard_commands
        self._guard_commands = []
        return self._commands.exchange(trainer, commands, due)

    def _steer(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        due = trainer.world_size == 1 or trainer.global_step % self.command_every == 0
        for command in self._receive_commands(trainer, due):
            self._apply(trainer, pl_module, batch, command)
        while self._loop.paused and not trainer.should_stop:
            time.sleep(0.05)
            for command in self._receive_commands(trainer):
                self._apply(trainer, pl_module, batch, command)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
               command: dict[str, Any]) -> None:
        op, args = command.get("op"), command.get("args", {})
        ack = self._acknowledger(trainer)
        if "divergence" in command and self._guard is not None:   # the guard's own command: judge afresh after it
            self._guard.rearm()
        if op in LOOP_OPS:
            point = (self.rewinds.before_command(trainer, pl_module, command,
                                                 self._steering_engine(trainer, pl_module, batch), self.history)
                     if self.rewinds is not None and op in CHANGING_OPS else None)   # set_batch_size
            refused = []

            def loop_ack(answered, status, **details):
                refused.extend([True] if answered is command and status == ERROR else [])
                ack(answered, status, **details)

            self._loop.apply(trainer, pl_module, command, loop_ack, lambda state: self._set_state(state, trainer))
            if point is not None and refused:
                self.rewinds.discard(point)
            return
        holder = parameter_copy_holder(trainer) if op in STRUCTURAL_OPS else None
        if holder is not None:  # refused before anything changes, on every rank alike
            ack(command, ERROR, error=f"{op}: {holder}, which cannot follow a change of shapes (the run would fail "
                                        "at its next use); train without it to change the network's structure")
            return
        engine = self._steering_engine(trainer, pl_module, batch)
        if op in HISTORY_OPS:
            self._go_back(trainer, pl_module, command, engine)
            return
        point = (self.rewinds.before_command(trainer, pl_module, command, engine, self.history)
                 if self.rewinds is not None and op in CHANGING_OPS else None)
        result = engine.apply({"id": command["id"], "op": op, "args": args})
        if not result.get("ok"):
            if point is not None:
                self.rewinds.discard(point)
            ack(command, ERROR, error=result.get("error") or "the steering engine refused it")
            return
        if result.get("structural"):
            self._after_structural_change(trainer, pl_module, result)
        elif op in FREEZE_OPS:
            self._telemetry(trainer, lambda: self._publish_structure(pl_module))  # the frozen marks changed
        if op == SET_HPARAMS:
            self._telemetry(trainer, lambda: self._publish_hparams(trainer))
        done = {key: value for key, value in result.items() if key not in ("id", "op", "ok", "error")}
        done["revision"] = self.history.revision
        if point is not None:
            done["restore_point"] = point.id   # ``rewind {"point": …}`` takes this command back
        ack(command, DONE, result=done)

    def _go_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, command: dict[str, Any],
                 engine) -> None:
        """``undo`` or ``rewind``: restore a point, then follow it as a change of structure (``steering.rewind``)."""
        from revacnn.steering.errors import SteeringError

        ack = self._acknowledger(trainer)
        if self.rewinds is None:
            ack(command, ERROR, error=f"{command.get('op')}: restore points are off (restore_points=None)")
            return
        self._telemetry(trainer, lambda: self.telemetry.steps.flush(trainer))  # the old branch's steps come first
        try:
            result = self.rewinds.apply(trainer, pl_module, command, engine, self.history, self._loop, ack)
        except SteeringError as error:
            ack(command, ERROR, error=str(error))
            return
        self._window.batch_start_step = trainer.global_step
        self._follow_new_parameters(trainer, pl_module)
        if "divergence" in command:
            result["divergence"] = command["divergence"]
        ack(command, DONE, result={**result, "revision": self.history.revision})

    def _watch_divergence(self, trainer: pl.Trainer, outputs: Any) -> None:
        """Give the divergence guard this batch's loss; when it fires, publish the event and queue its command."""
        self._guard.observe(trainer.global_step, batch_loss(outputs))
        info = self._guard.poll()
        if info is None:
            return
        command = self._guard.respond(info, self.rewinds)
        rank_zero_warn(f"revacnn: divergence at step {info['step']} ({info['reason']}, loss {info['loss']}): "
                       f"{info['action']}" + (f" to restore point {info['restore_point']}"
                                              if "restore_point" in info else ""))
        if self.publisher is not None:
            self.publisher.set_status(divergence={**info, "count": self._guard.fired})
        if command is not None:
            self._guard_commands.append(command)

    def _restore_frozen(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Freeze again what was frozen when the checkpoint was saved (or the module's last fit ended), before the
        first optimizer step: a frozen layer must not train again because the run resumed."""
        state, self.history.frozen_to_restore = self.history.frozen_to_restore, None
        skipped = self._steering_engine(trainer, pl_module, batch).freezer.load_state(state)
        if skipped:
            rank_zero_warn(f"revacnn: could not freeze again {', '.join(skipped)}: not in the model")
        rank_zero_info(f"revacnn: froze again {len(state.get('layers') or {})} layer(s) and the filters of "
                       f"{len(state.get('filters') or {})} layer(s) that were frozen before")
        if self.publisher is not None:
            self._telemetry(trainer, lambda: self._publish_structure(pl_module))  # the frozen marks changed

    def _frozen_layers(self) -> dict[str, Any]:
        """The layers (or filters) a ``freeze`` command froze (a bound method, not a lambda: the callback pickles)."""
        return self.engine.frozen() if self.engine is not None else {}

    def _acknowledger(self, trainer: pl.Trainer) -> Callable[..., None]:
        """``ack(command, status, error=None, result=None)``: answer a command at the trainer's step."""
        return lambda command, status, **details: self._run.ack(command, status, trainer, **details)

    def _steering_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any):
        if self.engine is None:
            from revacnn.steering import SteeringEngine

            tensors = first_batch_tensors(batch)
            probe_batch = self.telemetry.images.probe_batch
            example = (probe_batch[0] if probe_batch is not None
                       else tensors[0][:2] if tensors is not None else None)
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            self.engine = SteeringEngine(pl_module, list(trainer.optimizers), schedulers, example_input=example,
                                         distributed=trainer.world_size > 1)
            self.engine.changelog = self.history.changelog
        return self.engine

    def _after_structural_change(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 ack: dict[str, Any]) -> None:
        """Follow a change of shapes: filter ids, hooks, DDP wrapper, compiled graphs, and a new structure."""
        self.history.follow(ack, renamed_too=[self.telemetry.snapshots.previous])
        self._follow_new_parameters(trainer, pl_module)

    def _follow_new_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Follow new parameter objects (a change of shapes, a restore point put back): the DDP wrapper, compiled
        graphs, the monitored layers, and a new structure."""
        if trainer.world_size > 1:
            rewrap_ddp(trainer)
        if hasattr(torch, "compiler"):
            torch.compiler.reset()
        self.telemetry.layers_changed(discover_layers(pl_module, self.layer_selectors))
        if self.publisher is not None:
            self._telemetry(trainer, lambda: self._publish_structure(pl_module))
            self._telemetry(trainer, lambda: self._publish_hparams(trainer))

    def _telemetry(self, trainer: pl.Trainer, work: Callable[[], None]) -> None:
        """Do ``work`` unless telemetry has stopped; a fault in it stops telemetry, never the training."""
        self.telemetry.guarded(work)
