"""The validation images the callback keeps for the whole run: a few to probe activation maps with, and a subset
whose predictions are published after each validation (DeepTracker's image × iteration view); and the callback's
own forwards on them, which leave the training's random draws and precision as they are."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from revacnn.telemetry.activations import eval_mode, logits_of


def first_batch_tensors(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(images, labels) of a batch given as a tuple/list or a dict with image/label-like keys."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict):
        images = next((batch[k] for k in ("image", "images", "img", "pixel_values", "x", "input", "inputs")
                       if k in batch), None)
        labels = next((batch[k] for k in ("label", "labels", "y", "target", "targets") if k in batch), None)
        if isinstance(images, torch.Tensor):
            return images, labels if isinstance(labels, torch.Tensor) else None
    return None


def class_labels(labels: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, str | None]:
    """The kept images' labels as one class index per image — what image predictions and the probe's loss need —
    or None and why they are not."""
    if any(batch is None for batch in labels):
        return None, "the validation batches carry no labels"
    shapes = {tuple(batch.shape[1:]) for batch in labels}
    dtype = str(labels[0].dtype).removeprefix("torch.")
    if shapes != {()} or labels[0].is_floating_point() or labels[0].is_complex():
        shape = f"[{', '.join(['N', *map(str, next(iter(shapes)))])}]" if len(shapes) == 1 else "of several shapes"
        return None, f"the validation labels are {dtype} {shape}, not one class index per image"
    return torch.cat(labels).long(), None  # int32 or bool classes too: cross-entropy wants int64


def as_validation_step_gets_it(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """A validation batch as Lightning hands it to ``validation_step``: converted to the run's precision, through
    the module's (or datamodule's) batch-transfer hooks, on the module's device — what the model expects."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


@contextlib.contextmanager
def randomness_kept(device: torch.device) -> Iterator[None]:
    """Put the global random generators back afterwards (torch's CPU one and the module's CUDA device's, Python's,
    NumPy's): the callback's own work — iterating the validation data draws a DataLoader seed, a forward may sample
    noise — must leave the training's random draws, and so its results, as they are without the callback."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def own_forward(pl_module: pl.LightningModule) -> Iterator[None]:
    """A forward of the callback's own (graph trace, probe pass, predictions): in the run's precision, and leaving
    the random generators as it found them."""
    with randomness_kept(pl_module.device), pl_module.trainer.precision_plugin.forward_context():
        yield


def _read_validation_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, wanted: int,
                             images: list[torch.Tensor], labels: list[torch.Tensor | None]) -> None:
    """Append up to ``wanted`` images from the first validation loader, in host memory, and their labels (if any),
    to ``images`` and ``labels`` (filled in place: what was read before an error is kept)."""
    loader = trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()
    # Several validation loaders (a list, or a dict of named ones): images come from the first.
    loaders = list(loader.values()) if isinstance(loader, Mapping) else \
        loader if isinstance(loader, (list, tuple)) else [loader]
    count = 0
    for batch in loaders[0] if loaders and loaders[0] is not None else []:
        tensors = first_batch_tensors(as_validation_step_gets_it(trainer, pl_module, batch))
        if tensors is None or (images and tensors[0].shape[1:] != images[0].shape[1:]):
            break  # not images, or images of another size than the first batch's: keep what fits together
        # Kept in host memory from the start: on a GPU, the kept images and their concatenation
        # would otherwise both sit in device memory (1,000 ImageNet-sized images are 600 MB each time).
        images.append(tensors[0][: wanted - count].cpu())
        labels.append(None if tensors[1] is None else tensors[1][: wanted - count].cpu())
        count += len(images[-1])
        if count >= wanted:
            break


class ValidationImages:
    """The images kept for the whole run, and why there are none (or no labels) where that is so."""

    def __init__(self) -> None:
        self.probe_batch: tuple[torch.Tensor, torch.Tensor | None] | None = None   # on the module's device
        self.probe_labels: list[int] = []
        self.probe_error: str | None = None
        self.val_subset: tuple[torch.Tensor, np.ndarray] | None = None   # images (host), their classes
        self.val_error: str | None = None

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe_images: int, val_subset: int) -> None:
        """Keep ``probe_images`` and ``val_subset`` validation images (the same ones for the whole run), with their
        labels where the batches carry one class index per image."""
        wanted = max(probe_images, val_subset)
        if not wanted:
            return
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor | None] = []
        with randomness_kept(pl_module.device):  # a DataLoader iterator draws its seed from torch's generator
            try:
                _read_validation_batches(trainer, pl_module, wanted, images, labels)
            except Exception as error:  # a model without validation data still trains and publishes
                self.probe_error = f"validation images unavailable ({type(error).__name__}: {error})"
        if not images:
            self.probe_error = self.probe_error or "no validation batches of images to probe with"
            return
        device = pl_module.device
        all_images = torch.cat(images)
        all_labels, self.val_error = class_labels(labels)
        if self.val_error:  # unlabelled, multi-label, soft or regression targets, masks: images only
            rank_zero_info(f"revacnn: {self.val_error}: validations are published without image predictions, and "
                           "the probe's activation gradients are those of the sum of the outputs")
        if probe_images:
            self.probe_batch = (all_images[:probe_images].to(device),
                                None if all_labels is None else all_labels[:probe_images].to(device))
            # Read here, from host memory: a snapshot reading them off the device would sync.
            self.probe_labels = [] if all_labels is None else all_labels[:probe_images].tolist()
        if val_subset and all_labels is not None:
            # Each validation moves them over in chunks (pinned: the copies are asynchronous).
            kept = all_images[:val_subset]
            self.val_subset = (kept.pin_memory() if device.type == "cuda" else kept,
                               all_labels[:val_subset].numpy())

    @torch.no_grad()
    def predict(self, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """The predicted class of every kept validation image; None, with a warning once, when the module's forward
        does not map those images to ``[N, classes]`` logits (the run goes on without predictions)."""
        images, _ = self.val_subset
        predictions = []
        try:
            with eval_mode(pl_module), own_forward(pl_module):
                for chunk in images.split(256):
                    out = logits_of(pl_module(chunk.to(pl_module.device, non_blocking=True)))
                    if out.dim() != 2:
                        raise TypeError(f"forward returned logits of shape {list(out.shape)}, not [N, classes]")
                    # one output per image is a binary classifier's logit of class 1
                    predictions.append((out[:, 0] > 0).long() if out.shape[1] == 1 else out.argmax(dim=1))
            return torch.cat(predictions)
        except Exception as error:
            self.val_subset = None
            self.val_error = f"predicting the kept validation images failed ({type(error).__name__}: {error})"
            rank_zero_warn(f"revacnn: {self.val_error}; validations are published without them from now on")
            return None
