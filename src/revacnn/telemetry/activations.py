"""The probe pass: the monitored layers' activation maps on the kept probe images and the loss's gradient with
respect to them, from a forward of the callback's own in evaluation mode; and the logits in what a forward returns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluation mode for every submodule, restoring each one's own flag afterwards."""
    flags = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


def _probe_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The probe batch's loss: cross-entropy for ``[N, classes]`` logits, binary cross-entropy for one logit per
    image (a binary classifier), the sum of the outputs without class labels or for outputs of another shape."""
    if labels is None or logits.dim() != 2:
        return logits.float().sum()
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), labels.float())
    return F.cross_entropy(logits, labels)


def logits_of(output: object) -> torch.Tensor:
    """The logits in what a module's ``forward`` returned: the tensor itself; the first element of a tuple or list
    (``(logits, features)``, a main head before its auxiliary ones); the ``logits`` of a mapping or of a model output
    object (Hugging Face style). Raises ``TypeError`` saying what was returned when there are none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"forward returned {type(output).__name__}, not a tensor of logits (nor a tuple that starts with "
                    "one, nor one named 'logits')")


def probe_pass(module: nn.Module, layers: Sequence[tuple[str, nn.Module]], images: torch.Tensor,
               labels: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of every monitored layer on the probe images, and the gradient of the probe loss w.r.t. them.

    Runs in eval mode (BatchNorm statistics and dropout untouched) and differentiates only with respect to the
    activations, so no parameter's ``.grad`` changes. The loss is ``_probe_loss``. Both come channels first,
    ``[P, C, …]``: a Linear applied to tokens (``[P, T, C]``) has its features moved from the last dim to dim 1, so
    that index ``i`` of dim 1 is filter ``i``'s output for every layer.
    """
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                outputs[name] = output
        return hook

    # prepended: each layer's own output, before the layers insert_layer put after it (steering/insertion.py)
    handles = [layer.register_forward_hook(keep(name), prepend=True) for name, layer in layers]
    try:
        with eval_mode(module), torch.enable_grad():
            images = images.detach().clone().requires_grad_(True)
            loss = _probe_loss(logits_of(module(images)), labels)
            names = [name for name in outputs if outputs[name].requires_grad]
            grads = torch.autograd.grad(loss, [outputs[name] for name in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    convs = {name for name, layer in layers if isinstance(layer, nn.modules.conv._ConvNd)}

    def channels_first(name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor if name in convs or tensor.dim() <= 2 else tensor.movedim(-1, 1).contiguous()

    activations = {name: channels_first(name, output) for name, output in outputs.items()}
    activation_grads = {name: channels_first(name, grad if grad is not None else torch.zeros_like(outputs[name]))
                        for name, grad in zip(names, grads)}
    return activations, activation_grads
