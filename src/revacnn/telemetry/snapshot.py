"""The ``snapshot`` message: every monitored layer's full weights and gradients, their DeepTracker statistics, each
filter's change since the last snapshot, and the probe images' activation maps with their gradients."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from revacnn.heap import release_freed_memory
from revacnn.telemetry.activations import probe_pass
from revacnn.telemetry.probes import filters_first, flatten
from revacnn.telemetry.statistics import filter_change, tensor_stats
from revacnn.telemetry.transfer import HostCopy, PendingMessage
from revacnn.telemetry.validation import ValidationImages, own_forward
from revacnn.wire.protocol import STAT_FIELDS


TRIM_AFTER_BYTES = 8 << 20   # snapshots whose weights take at least this much give the freed heap back before packing


class Snapshots:
    """Builds snapshots, keeping each layer's weights of the last one (to say how much each filter changed).

    The weights kept are the snapshot's own packed weights (views of one float32 buffer that the message also sends),
    so a snapshot in flight and the weights kept for the next one are one copy, not two; the last snapshot's are let
    go once every filter's change has been computed, before the new buffer is made."""

    def __init__(self, max_activation_bytes: int) -> None:
        self.max_activation_bytes = max_activation_bytes
        self.previous: dict[str, torch.Tensor] = {}     # [filters, coefficients] weights at the last snapshot, by layer

    def keep_only(self, names: set[str] | dict[str, Any]) -> None:
        """Forget the layers no longer monitored."""
        self.previous = {name: value for name, value in self.previous.items() if name in names}

    @torch.no_grad()
    def message(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, revision: int,
                layers: list[tuple[str, nn.Module]], images: ValidationImages) -> PendingMessage:
        weights = [filters_first(module, module.weight.detach()) for _, module in layers]
        changes = [filter_change(weight, self.previous.get(name)) for (name, _), weight in zip(layers, weights)]
        self.previous = {}
        copy = HostCopy()
        packed, layout = self._keep_weights(layers, weights)
        copy.add_packed(packed, layout)
        weight_stats, grad_stats = [], []
        for (name, module), weight, (cosine, delta) in zip(layers, weights, changes):
            grad = module.weight.grad
            grad = torch.zeros_like(weight) if grad is None else filters_first(module, grad.detach())
            copy.add(f"grad/{name}", grad)
            copy.add(f"cosine/{name}", cosine)
            copy.add(f"delta_ratio/{name}", delta)
            weight_stats.append(tensor_stats(weight))
            grad_stats.append(tensor_stats(grad))
        copy.add("weight_stats", torch.stack(weight_stats))
        copy.add("grad_stats", torch.stack(grad_stats))
        body = {"step": step, "epoch": trainer.current_epoch, "revision": revision,
                "layer_names": [name for name, _ in layers], "stat_fields": list(STAT_FIELDS)}
        if images.probe_batch is not None:
            self._add_probe_maps(copy, pl_module, layers, images, body)
        elif images.probe_error:
            body["probe_error"] = images.probe_error
        # The probe pass and the per-filter comparisons freed as much heap as a few layers; glibc would keep it, and
        # the packed copy made next would come on top of it (on a ResNet-50 the recorder's trim after the write gave
        # back ~40 MB: held until then, it was part of the snapshot's peak). A small model's leave little to give
        # back, and the trim costs ~3 ms and the page faults of the heap's regrowth in the next steps.
        if packed.numel() * packed.element_size() >= TRIM_AFTER_BYTES:
            release_freed_memory()
        return PendingMessage("snapshot", body, copy.launch())

    def _keep_weights(self, layers: list[tuple[str, nn.Module]], weights: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, list[tuple[str, tuple[int, ...], int]]]:
        """Every layer's weights in one new float32 buffer, kept (as per-layer views) for the next snapshot's
        comparison, and its layout as ``weight/<layer>`` buffers of the message. Nothing writes to it after this."""
        device = weights[0].device
        flat = flatten([weight if weight.device == device else weight.to(device) for weight in weights]).float()
        layout, offset = [], 0
        for (name, _), weight in zip(layers, weights):
            count = weight.numel()
            self.previous[name] = flat[offset:offset + count].view(weight.shape[0], -1)
            layout.append((f"weight/{name}", tuple(weight.shape), count))
            offset += count
        return flat, layout

    def _add_probe_maps(self, copy: HostCopy, pl_module: pl.LightningModule, layers: list[tuple[str, nn.Module]],
                        images: ValidationImages, body: dict[str, Any]) -> None:
        """The probe images' activation maps and their gradients, layer by layer while they fit the byte budget."""
        probe_images, labels = images.probe_batch
        try:
            with own_forward(pl_module):
                activations, activation_grads = probe_pass(pl_module, layers, probe_images, labels)
        except Exception as error:  # a forward that does not map images to logits: no maps, say why
            body["probe_error"] = f"probe pass failed ({type(error).__name__}: {error})"
            return
        budget = self.max_activation_bytes
        skipped = []
        for name, _ in layers:
            if name not in activations:
                continue
            size = activations[name].numel() * 8  # activation + its gradient, float32
            if size > budget:
                skipped.append(name)
                continue
            budget -= size
            copy.add(f"act/{name}", activations[name])
            copy.add(f"actgrad/{name}", activation_grads.get(name, torch.zeros_like(activations[name])))
        copy.add("probe_images", probe_images)
        body["probe_labels"] = images.probe_labels
        if skipped:
            body["probe_skipped"] = skipped
