"""One run's telemetry on rank 0: the monitored layers and their probe, the kept validation images, and the
messages published from them — each guarded so that a fault of the tool stops telemetry, never the training."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from revacnn.checkpoint import ModelHistory
from revacnn.telemetry.budget import OverheadBudget
from revacnn.telemetry.messages import (StepMessages, hparams_message, in_traced_order, structure_message,
                                        traced_graph, untrainable_layers, validation_message)
from revacnn.telemetry.probes import FilterProbe, filter_count
from revacnn.telemetry.schedule import Schedule, StepWindow
from revacnn.telemetry.snapshot import Snapshots
from revacnn.telemetry.validation import ValidationImages
from revacnn.wire.publisher import Publisher

log = logging.getLogger("revacnn.callback")   # the callback's logger: where users look for its faults


class Telemetry:
    """What rank 0 measures and publishes during one run (``publisher`` is None on other ranks and before the run
    opens: every ``publish_*`` is then a no-op).

    ``history`` gives the filter ids and the revision, ``frozen`` the layers a ``freeze`` command froze.
    """

    def __init__(self, schedule: Schedule, budget: OverheadBudget, max_activation_bytes: int, history: ModelHistory,
                 frozen: Callable[[], dict[str, Any]], activation_images: int | None = None,
                 run_name: str | None = None) -> None:
        self.schedule = schedule
        self.run_name = run_name                              # the user's name for the run, in every structure
        self.budget = budget
        self.activation_images = activation_images
        self.history = history
        self.frozen = frozen
        self.publisher: Publisher | None = None
        self.layers: list[tuple[str, nn.Module]] = []
        self.probe: FilterProbe | None = None
        self.steps = StepMessages()
        self.images = ValidationImages()
        self.snapshots = Snapshots(max_activation_bytes)
        self.error: str | None = None                         # why telemetry stopped (an internal error)
        self.untrainable_shown: list[str] = []                # layers without a trainable parameter, as last published
        self._snapshot_seconds = 0.0                          # what the snapshot of the step being published took
        self._metrics_before_validation: dict[str, Any] = {}

    def attach(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.steps.attach(publisher)
        self.budget.ledgers = publisher.ledgers
        publisher.set_status(schedule=self.budget.report())

    def guarded(self, work: Callable[[], None]) -> None:
        """Do ``work`` (measure or publish) unless telemetry has stopped. An error in it stops telemetry for the rest
        of the run — a warning, its traceback logged, ``telemetry_error`` in the heartbeat — instead of ending the
        training: steering, acks and the heartbeat go on."""
        if self.error is not None:
            return
        try:
            work()
        except Exception as error:  # noqa: BLE001 - a fault of the tool must not cost the user's run
            self.error = f"{type(error).__name__}: {error}"[:1000]
            log.error("revacnn: telemetry failed", exc_info=error)
            rank_zero_warn(f"revacnn: telemetry stopped after an internal error ({self.error}); the "
                           "training goes on and commands still work. The traceback is logged above: please report it")
            if self.probe is not None:
                self.probe.detach()
                self.probe = None
            self.steps.awaiting = self.steps.filter_stats = None
            if self.publisher is not None:
                self.publisher.set_status(telemetry_error=self.error)
            try:  # the steps read before the fault still go out
                self.steps.flush_rows()
            except Exception:  # noqa: BLE001
                log.debug("revacnn: the steps read before the fault could not be sent", exc_info=True)

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, selectors: list[Any] | None,
              probe_images: int, val_subset: int) -> None:
        """Keep the validation images, attach the probe, and publish ``structure`` and ``hparams``."""
        self.images.collect(trainer, pl_module, probe_images, val_subset)
        if self.layers:
            self.probe = FilterProbe(self.layers, activation_images=self.activation_images)
            self.probe.attach()
            if self.schedule.filters_every:  # its first call's costs (allocations, caches) paid here, not in a step
                self.probe.measure()
        else:
            wanted = ", ".join(map(str, selectors)) if selectors else "Conv2d or Linear"
            rank_zero_warn(f"revacnn: {type(pl_module).__name__} has no layer to monitor ({wanted}); only its "
                           "scalars are published")
        self.publish_structure(pl_module)
        self.publish_hparams(trainer)

    def measure(self) -> None:
        start = time.perf_counter()
        device_start = self.budget.device.start(self.layers[0][1].weight.device)
        self.steps.filter_stats = self.probe.measure()
        self.budget.device.stop("filters", device_start)
        hooks, self.probe.hook_seconds = self.probe.hook_seconds, 0.0
        self.budget.spent("filters", time.perf_counter() - start + hooks)

    def layers_changed(self, layers: list[tuple[str, nn.Module]]) -> None:
        """Follow a structural change: the new layers, their probe's hooks, and the snapshots' kept weights."""
        self.layers = layers
        self.snapshots.keep_only(dict(layers))
        if self.probe is not None:
            self.probe.reset(layers)

    def publish_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, window: StepWindow, outputs: Any,
                      batch_idx: int, previous: int, snapshot_requested: bool) -> bool:
        """At a batch's end: publish the step before, and read this one if it is due (an optimizer step); whether
        a snapshot was published."""
        step = trainer.global_step
        now = time.perf_counter()
        measured = self.steps.filter_stats is not None
        self._snapshot_seconds = 0.0
        published = self._publish_step(trainer, pl_module, window, outputs, batch_idx, previous, snapshot_requested,
                                       now)
        if step != previous:  # an optimizer step ended: publishing it is per-step telemetry's cost (or the filters')
            seconds = time.perf_counter() - now - self._snapshot_seconds
            self.budget.spent("filters" if measured else "scalars", seconds, more=measured)
            if self.budget.step_ended(time.perf_counter()):
                self.schedule.follow(self.budget.plan)
            if self.budget.planned:
                self.publisher.set_status(schedule=self.budget.report())
        return published

    def _publish_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, window: StepWindow, outputs: Any,
                      batch_idx: int, previous: int, snapshot_requested: bool, now: float) -> bool:
        step = trainer.global_step
        self.steps.batch_ended(now)
        self.steps.complete(trainer, now)  # the previous step: Lightning has finished it, its metrics are final
        window.add_batch_loss(outputs)
        if step == previous:  # no optimizer step in this batch: its gradient is being accumulated
            return False
        loss = window.step_loss(trainer)
        measured = self.steps.filter_stats is not None
        if measured and untrainable_layers(self.layers) != self.untrainable_shown:
            self.publish_structure(pl_module)  # the module's code (or a fine-tuning callback) froze or thawed layers
        if measured or self.schedule.due(previous, step, self.schedule.scalars_every):
            self.steps.read(trainer, loss, step, batch_idx, self.history.revision, [name for name, _ in self.layers])
        if snapshot_requested or self.schedule.due(previous, step, self.schedule.snapshot_every):
            self.publish_snapshot(trainer, pl_module, step)
            return True
        return False

    def validation_started(self, trainer: pl.Trainer) -> None:
        self.guarded(lambda: self.steps.flush(trainer))  # before validation's metrics join the training's
        self._metrics_before_validation = dict(trainer.callback_metrics)

    def publish_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Metrics logged during this validation are the values that changed since it started.
        metrics = {name: value for name, value in trainer.callback_metrics.items()
                   if value is not self._metrics_before_validation.get(name)}
        self.steps.val_metric_names.update(metrics)
        images = self.images
        predictions = images.predict(pl_module) if images.val_subset is not None else None
        labels = images.val_subset[1] if predictions is not None else None
        self.publisher.publish(validation_message(trainer, metrics, predictions, labels, images.val_error))

    def publish_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if not self.layers:
            return
        self.steps.flush_rows()  # the steps before this one (this one's metrics are not final yet)
        start = time.perf_counter()
        device_start = self.budget.device.start(self.layers[0][1].weight.device)
        message = self.snapshots.message(trainer, pl_module, step, self.history.revision, self.layers, self.images)
        self.budget.device.stop("snapshot", device_start)
        self.publisher.publish(message)
        self._snapshot_seconds = time.perf_counter() - start
        self.budget.spent("snapshot", self._snapshot_seconds)

    def publish_structure(self, pl_module: pl.LightningModule) -> None:
        """Trace the model (on the probe images when there are any) and publish ``structure``."""
        if self.publisher is None:
            return
        self.steps.flush(pl_module.trainer)  # steps measured before the change go out before it
        self.history.number_filters({name: filter_count(module) for name, module in self.layers})
        probe_batch = self.images.probe_batch
        traced = traced_graph(pl_module, [name for name, _ in self.layers],
                              probe_batch[0] if probe_batch is not None else None)
        self.layers = in_traced_order(self.layers, traced["order"])
        if self.probe is not None:
            self.probe.layers = list(self.layers)
        self.untrainable_shown = untrainable_layers(self.layers)
        frozen = {**self.frozen(), **dict.fromkeys(self.untrainable_shown, "all")}
        self.publisher.publish(structure_message(pl_module, self.history.revision, self.layers, traced,
                                                 self.history.filter_ids, frozen, self.run_name))

    def publish_hparams(self, trainer: pl.Trainer) -> None:
        if self.publisher is None:
            return
        self.steps.flush(trainer)
        self.publisher.publish(hparams_message(trainer, self.steps.batch_size))

    def close(self, trainer: pl.Trainer) -> None:
        """Detach the probe and publish the steps still held."""
        if self.probe is not None:
            self.probe.detach()
        if self.publisher is not None:
            self.guarded(lambda: self.steps.flush(trainer))
