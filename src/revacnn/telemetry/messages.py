"""The messages the callback publishes, assembled from what it measured: each optimizer step (``steps`` rows, or a
``step`` with per-filter data), ``val``, ``structure`` and ``hparams`` (docs/protocol.md §4)."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from revacnn.steering.insertion import own_named_parameters
from revacnn.telemetry.scalars import StepBatch, add_scalars, scalar_values
from revacnn.telemetry.structure import layer_description, trace
from revacnn.telemetry.transfer import HostCopy, PendingMessage
from revacnn.telemetry.validation import own_forward
from revacnn.wire.protocol import FILTER_FIELDS, Message
from revacnn.wire.publisher import Publisher


class AwaitingStep(NamedTuple):
    """A step read at its end, waiting for Lightning to finish it (its logged metrics)."""

    row: dict[str, Any]                                     # the plain fields of a ``steps`` row
    loss: torch.Tensor | None
    filters: tuple[torch.Tensor, torch.Tensor] | None       # per-filter data (FilterProbe.measure), if measured
    metrics: dict[str, Any] | None                          # read at the step's end when Lightning keeps none


def lightning_metrics(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The metrics Lightning computed at the end of the last batch it finished, as it keeps them (None if this
    Lightning keeps them elsewhere).

    Not ``trainer.callback_metrics``: that property recomputes every logged result on each call, and converts the
    progress-bar ones with ``.item()`` — a device sync per metric, per call.
    """
    metrics = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
    return metrics if isinstance(metrics, dict) else None


def plain_float(value: Any) -> float | None:
    """A float from a Python number or a CPU tensor (CUDA tensors are not read: that would sync)."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.device.type == "cpu" and value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def momentum(group: dict[str, Any]) -> float | None:
    if "momentum" in group:
        return plain_float(group["momentum"])
    if "betas" in group:
        return plain_float(group["betas"][0])
    return None


def groups(trainer: pl.Trainer) -> list[dict[str, Any]]:
    """Every optimizer parameter group's hyper-parameters, as the ``groups`` of a step or ``hparams``."""
    return [{"lr": plain_float(group.get("lr")), "momentum": momentum(group),
             "weight_decay": plain_float(group.get("weight_decay", 0.0))}
            for optimizer in trainer.optimizers for group in optimizer.param_groups]


def loader_batch_size(trainer: pl.Trainer) -> int:
    loader = getattr(trainer, "train_dataloader", None)
    return int(getattr(loader, "batch_size", 0) or 0)


class StepMessages:
    """Each optimizer step, read at its end and published once Lightning has finished it: in batches of ``steps``
    rows (``StepBatch``), or as a ``step`` message of its own when it carries per-filter data."""

    def __init__(self) -> None:
        self.steps: StepBatch | None = None
        self.publisher: Publisher | None = None
        self.awaiting: AwaitingStep | None = None
        self.filter_stats: tuple[torch.Tensor, torch.Tensor] | None = None   # measured, not read yet
        self.val_metric_names: set[str] = set()          # metrics logged in validation: not a step's
        self.batch_size = 0
        self._samples_per_s = 0.0
        self._last_batch_end: float | None = None

    def attach(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.steps = StepBatch(publisher.publish, publisher._drop_counts)

    def batch_ended(self, now: float) -> None:
        """Update the samples/s rate (an exponential moving average) at a batch's end."""
        if self._last_batch_end is not None and now > self._last_batch_end:
            rate = self.batch_size / (now - self._last_batch_end)
            self._samples_per_s = rate if not self._samples_per_s else 0.9 * self._samples_per_s + 0.1 * rate
        self._last_batch_end = now

    def read(self, trainer: pl.Trainer, loss: torch.Tensor | None, step: int, batch_idx: int, revision: int,
             layer_names: list[str]) -> None:
        """What is known of a step when it ends: its plain fields, its loss and its per-filter data, if any."""
        row = {"step": step, "epoch": trainer.current_epoch, "batch": batch_idx, "revision": revision,
               "groups": groups(trainer), "batch_size": self.batch_size,
               "samples_per_s": round(self._samples_per_s, 3), "time": time.time()}
        filters, self.filter_stats = self.filter_stats, None
        if filters is not None:  # named now: a structural change before the step is published changes the layers
            row["layer_names"] = layer_names
        # Without Lightning's kept dict, the public property now: at the step's end it holds this step's values.
        metrics = dict(trainer.callback_metrics) if lightning_metrics(trainer) is None else None
        self.awaiting = AwaitingStep(row, loss, filters, metrics)

    def complete(self, trainer: pl.Trainer, now: float | None = None) -> None:
        """Publish the step read last with the metrics it logged: as a ``steps`` row, or a ``step`` message when it
        has per-filter data.

        Called once Lightning has finished that step (at the next batch's end, or before anything that must follow
        it), because only then are its metrics in Lightning's own dict (see ``lightning_metrics``).
        """
        awaiting, self.awaiting = self.awaiting, None
        if awaiting is None or self.steps is None:
            return
        values: dict[str, Any] = {} if awaiting.loss is None else {"loss": awaiting.loss}
        metrics = awaiting.metrics if awaiting.metrics is not None else lightning_metrics(trainer) or {}
        values.update((name, value) for name, value in metrics.items() if name not in self.val_metric_names)
        if awaiting.filters is None:
            self.steps.add(awaiting.row, values.items(), time.perf_counter() if now is None else now)
        else:
            self.steps.flush()
            self._publish_step(awaiting, values)

    def flush(self, trainer: pl.Trainer) -> None:
        """Publish every step read so far, before a message that must follow them in step order. Only where
        Lightning has finished the last step: not in ``on_train_batch_end``."""
        self.complete(trainer)
        self.flush_rows()

    def flush_rows(self) -> None:
        """Publish the ``steps`` rows batched so far (not the step awaiting its metrics)."""
        if self.steps is not None:
            self.steps.flush()

    def _publish_step(self, awaiting: AwaitingStep, values: dict[str, Any]) -> None:
        """A step with per-filter data: its scalars and the filters, as one ``step`` message."""
        copy = HostCopy()
        scalar_names = add_scalars(copy, values.items())
        filters, layer_ratios = awaiting.filters
        copy.add("filters", filters)
        copy.add("layers", layer_ratios)
        body = dict(awaiting.row)
        body.update(per_filter=True, filter_fields=list(FILTER_FIELDS))
        publisher = self.publisher

        def finalize(body: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            not_finite: set = set()
            scalars = scalar_values(scalar_names, arrays, not_finite)
            if not_finite:
                body["not_finite"] = sorted(not_finite)
            body["loss"] = scalars.pop("loss", None)
            body["metrics"] = scalars
            body["drops"] = publisher._drop_counts()
            return arrays

        publisher.publish(PendingMessage("step", body, copy.launch(), finalize))


def validation_message(trainer: pl.Trainer, metrics: dict[str, Any], predictions: torch.Tensor | None,
                       labels: np.ndarray | None, pred_error: str | None) -> PendingMessage:
    """A ``val`` message: the metrics this validation logged, and the kept images' predictions with their classes."""
    copy = HostCopy()
    scalar_names = add_scalars(copy, metrics.items())
    if predictions is not None:
        copy.add("pred", predictions)
        copy.add("label", labels)
    body = {"step": trainer.global_step, "epoch": trainer.current_epoch,
            "count": 0 if predictions is None else int(predictions.shape[0])}
    if pred_error:
        body["pred_error"] = pred_error

    def finalize(body: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        not_finite: set = set()
        body["metrics"] = scalar_values(scalar_names, arrays, not_finite)
        if not_finite:
            body["not_finite"] = sorted(not_finite)
        return {name: array.astype(np.int16) for name, array in arrays.items()}

    return PendingMessage("val", body, copy.launch(), finalize)


#: the longest run name (``ReVACNNCallback(name=...)``): what a run picker's line shows
RUN_NAME_CHARS = 100


def validated_run_name(name: Any) -> str | None:
    """A user-set run name as the ``structure`` message carries it: None, or a non-blank printable ``str`` of at
    most ``RUN_NAME_CHARS`` characters (a newline or control character would break the dashboard's one-line
    labels). ValueError otherwise."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"name must be a str or None, got {type(name).__name__}")
    if not name.strip() or len(name) > RUN_NAME_CHARS or not name.isprintable():
        raise ValueError(f"name must be 1 to {RUN_NAME_CHARS} printable characters (no newline or control "
                         f"character), not blank, got {name[:120]!r}")
    return name


def structure_message(pl_module: pl.LightningModule, revision: int, layers: list[tuple[str, Any]],
                      traced: dict[str, Any], filter_ids: dict[str, list[int]], frozen: dict[str, Any],
                      run_name: str | None = None) -> Message:
    """A ``structure`` message of the monitored ``layers`` (in the traced order) and the traced graph;
    ``run_name``: the user's name for the run (``name``, nil when none was given)."""
    descriptions = [layer_description(name, module, traced["output_shapes"].get(name, []), filter_ids[name],
                                      frozen.get(name)) for name, module in layers]
    params = list(pl_module.parameters())
    body = {"revision": revision, "model": type(pl_module).__name__, "name": run_name,
            "total_params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "layers": descriptions, "modules": traced["modules"], "edges": traced["edges"],
            "layer_edges": traced["layer_edges"]}
    return Message("structure", body)


def hparams_message(trainer: pl.Trainer, batch_size: int) -> Message:
    """The hyper-parameters now. ``batch_size`` is the training loader's (the one a ``set_batch_size`` rebuilt it
    with, at the start of the epoch it takes effect in); the last batch's size (``batch_size``, still the old one
    then, or a short last batch) only where the loader's is not readable (a batch sampler, several loaders)."""
    optimizers = trainer.optimizers
    body = {"step": trainer.global_step, "groups": groups(trainer),
            "optimizer": type(optimizers[0]).__name__ if optimizers else "",
            "batch_size": loader_batch_size(trainer) or batch_size, "max_epochs": trainer.max_epochs,
            "schedulers": [type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs]}
    return Message("hparams", body)


def traced_graph(pl_module: pl.LightningModule, layer_names: list[str],
                 images: torch.Tensor | None) -> dict[str, Any]:
    """The model's graph traced on the probe images (``telemetry.structure.trace``); without images, or where the
    trace fails (with a warning), the layers in their own order and no graph."""
    traced: dict[str, Any] = {"order": list(layer_names), "output_shapes": {}, "modules": [], "edges": [],
                              "layer_edges": []}
    if images is not None:
        try:
            with own_forward(pl_module):
                traced = trace(pl_module, images, layer_names)
        except Exception as error:
            rank_zero_warn(f"revacnn: could not trace the model's graph ({type(error).__name__}: {error})")
    return traced


def in_traced_order(layers: list[tuple[str, nn.Module]], order: list[str]) -> list[tuple[str, nn.Module]]:
    """``layers`` in the order the forward called them; those it never called last."""
    by_name = dict(layers)
    ordered = [name for name in order if name in by_name]
    ordered += [name for name, _ in layers if name not in ordered]
    return [(name, by_name[name]) for name in ordered]


def untrainable_layers(layers: list[tuple[str, nn.Module]]) -> list[str]:
    """Monitored layers none of whose parameters requires a gradient: frozen by the user's code (a fine-tuning
    backbone, ``BackboneFinetuning``) or, on one device, by a ``freeze`` command."""
    return [name for name, layer in layers if not trainable(layer)]


def trainable(layer: nn.Module) -> bool:
    """Whether any of ``layer``'s own parameters requires a gradient. Checked on every measured step: its weight
    first (the usual answer, without walking the layer's parameters)."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.requires_grad:
        return True
    return any(p.requires_grad for _, p in own_named_parameters(layer))
