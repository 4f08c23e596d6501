"""``ReVACNNCallback``: watch and steer a Lightning run while it trains.

Hooks stay thin and delegate: what is due comes from ``telemetry.schedule``; ``telemetry.session`` measures
(``telemetry.probes``) and publishes (``telemetry.messages``, ``telemetry.snapshot``: one packed host copy each,
handed to the I/O thread of ``wire.publisher``); the run's directory, publisher, recorder and state are ``run``'s,
the change log in checkpoints ``checkpoint``'s, and ``steering.session`` receives steering commands and applies them
at the safe point before each batch (restore points, undo, rewind and the divergence guard included). The arguments
are checked when the callback is made (``options``, ``run.Transport``). Only global rank 0 measures, publishes and
records; every rank takes part in the command broadcast so that all of them steer identically at the same step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from revacnn.checkpoint import CheckpointHooks, ModelHistory, changelog_entry, has_lazy_parameters
from revacnn.options import SteeringOptions, TelemetryOptions
from revacnn.run import Run, Transport
from revacnn.steering.restore_store import RestorePolicy
from revacnn.steering.session import SteeringSession
from revacnn.telemetry.budget import OverheadBudget
from revacnn.telemetry.messages import validated_run_name
from revacnn.telemetry.probes import discover_layers
from revacnn.telemetry.schedule import Schedule, StepWindow
from revacnn.telemetry.session import Telemetry
from revacnn.telemetry.validation import first_batch_tensors

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
        self.transport = Transport(host, telemetry_port, control_port, record, sign, send_hwm, queue_size,
                                   insecure_bind, bool(curve) or keys_dir is not None, keys_dir,
                                   {"disk_budget": disk_budget, "disk_min_free": disk_min_free,
                                    "snapshot_keep": snapshot_keep, "snapshot_dtype": snapshot_dtype})
        self.telemetry_options = TelemetryOptions(budget, scalars_every, filters_every, snapshot_every,
                                                  activation_images, probe_images, val_subset, max_activation_bytes)
        self.steering_options = SteeringOptions(steering, command_every, restore_points, on_divergence,
                                                on_recording_error)
        self.layer_selectors = list(layers) if layers is not None else None

        self.history = ModelHistory()   # kept from one fit to the next: a checkpoint must replay every change
        self._checkpoint_hooks = CheckpointHooks()
        self._run_dir_given = Path(run_dir) if run_dir is not None else None
        self._fits = 0
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What belongs to one run (one ``fit``): a second fit with this callback records a new run."""
        options = self.telemetry_options
        self._run = Run(self._run_dir_given)
        self._frozen_at_end: dict[str, Any] | None = None   # the engine's frozen set when the fit ended
        self.schedule = Schedule(**options.initial_plan())
        budget = OverheadBudget(options.budget, self.schedule.as_plan(), options.fixed_cadences())
        self.telemetry = Telemetry(self.schedule, budget, options.max_activation_bytes, self.history,
                                   self._frozen_layers, options.activation_images, run_name=self.run_name)
        self._window = StepWindow()
        self.steering_session = SteeringSession(self.steering_options, self._run, self.telemetry, self.history,
                                                self._window, self.layer_selectors, self._set_state)
        self._probe_armed = False                            # the probe's state while a validation runs
        self._awaiting_shapes = False                        # lazy layers: telemetry starts after the first batch

    # -- what the run and its telemetry hold, under the callback's names -----------------------------------------
    run_id = property(lambda self: self._run.run_id)
    run_dir = property(lambda self: self._run.run_dir)
    publisher = property(lambda self: self._run.publisher)
    recorder = property(lambda self: self._run.recorder)
    connection_file = property(lambda self: self._run.connection_file)
    paused = property(lambda self: self.steering_session.loop.paused)
    engine = property(lambda self: self.steering_session.engine)
    rewinds = property(lambda self: self.steering_session.rewinds)   # restore points, undo, rewind
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
            self.telemetry.attach(self._run.open(trainer, log_dir, self.transport))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window.starts = True
        self.telemetry.layers = discover_layers(pl_module, self.layer_selectors)
        # Lazy layers (LazyConv2d, LazyLinear) get their shapes in the first forward: telemetry and steering start
        # after it, so the model is initialised by the training batch as it would be without this callback.
        self._awaiting_shapes = has_lazy_parameters(pl_module)  # on every rank: steering follows it
        if self._awaiting_shapes:
            rank_zero_info("revacnn: the model has lazy layers; telemetry and steering start once the first batch has "
                           "given them their shapes")
        self.steering_session.start(trainer)
        if trainer.is_global_zero:
            if trainer.ckpt_path:
                # Known here, not in ``on_fit_start``: Lightning restores the loops' state in between.
                self._run.announce_resume(trainer, self.history.resumed_run)
            if not self._awaiting_shapes:
                self._telemetry(trainer, lambda: self._start_telemetry(trainer, pl_module))
            self._set_state("running", trainer)

    def _start_telemetry(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options = self.telemetry_options
        self.telemetry.start(trainer, pl_module, self.layer_selectors, options.probe_images, options.val_subset)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steering_session.fit_ended(trainer, pl_module)  # every command gets a final ack
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
        self.steering_session.close()
        self._run.close()

    # -- every batch --------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._window.batch_start_step = step = trainer.global_step  # this batch makes the steps after it
        if self.history.frozen_to_restore and not self._awaiting_shapes:
            self.steering_session.restore_frozen(trainer, pl_module, batch)
        if self._window.starts and not self._awaiting_shapes:  # never inside one accumulated step
            self.steering_session.steer(trainer, pl_module, batch)   # nothing when steering is off
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
        if trainer.is_global_zero:
            self.steering_session.watch_divergence(trainer, outputs)
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
                                        self.steering_session.loop.snapshot_requested):
            self.steering_session.loop.snapshot_requested = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._telemetry(trainer, lambda: self.telemetry.steps.flush(trainer))
        self.steering_session.loop.epoch_ended(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steering_session.epoch_started(trainer, pl_module):
            self._telemetry(trainer, lambda: self.telemetry.publish_hparams(trainer))

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

    def _set_state(self, state: str, trainer: pl.Trainer, message: str = "") -> None:
        self.telemetry.steps.flush(trainer)  # a paused, stopped or failed run shows every step it took
        self._run.set_state(state, trainer, message)

    def _frozen_layers(self) -> dict[str, Any]:
        """The layers (or filters) a ``freeze`` command froze (a bound method, not a lambda: the callback pickles)."""
        return self.engine.frozen() if self.engine is not None else {}

    def _telemetry(self, trainer: pl.Trainer, work: Callable[[], None]) -> None:
        """Do ``work`` unless telemetry has stopped; a fault in it stops telemetry, never the training."""
        self.telemetry.guarded(work)
