"""Quantities: what is measured on the device, per monitored layer and per filter (docs/protocol.md §4).

Every function here returns device tensors and never reads a value back to the host; the callback decides when
each quantity is due and packs the results into one host copy (``revacnn.transfer``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revacnn.protocol import STAT_FIELDS

MONITORED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
_QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs; larger tensors are sampled with a fixed stride


def discover_layers(module: nn.Module, layers: Iterable[str | type[nn.Module]] | None = None
                    ) -> list[tuple[str, nn.Module]]:
    """Monitored layers of ``module``: every Conv2d and Linear by default, or those named / of the given types.

    Raises ``ValueError`` naming any requested layer that does not exist or has no ``weight``.
    """
    selectors = list(layers) if layers is not None else list(MONITORED_TYPES)
    names = {item for item in selectors if isinstance(item, str)}
    types = tuple(item for item in selectors if isinstance(item, type))
    found = [(name, sub) for name, sub in module.named_modules()
             if name and (name in names or (types and isinstance(sub, types)))]
    missing = names - {name for name, _ in found}
    if missing:
        raise ValueError(f"monitored layers not found in {type(module).__name__}: {', '.join(sorted(missing))}")
    without_weight = [name for name, sub in found if not isinstance(getattr(sub, "weight", None), torch.Tensor)]
    if without_weight:
        raise ValueError(f"monitored layers need a weight tensor: {', '.join(without_weight)}")
    return found


def channel_abs_mean(output: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Mean |activation| per output channel: channels on dim 1 for conv outputs (N, C, …), last dim otherwise."""
    output = output.detach()
    if channels_first and output.dim() > 2:
        return output.abs().mean(dim=[0, *range(2, output.dim())])
    return output.abs().reshape(-1, output.shape[-1]).mean(dim=0)


class FilterProbe:
    """Per-filter statistics of a step: gradient, weight, update since the previous measurement, activation.

    ``arm()`` before the forward pass makes the forward hooks record mean |activation| per channel; ``measure()``
    after back-propagation returns ``([5, F] filters, [L] layer ‖g‖/‖w‖)`` in ``FILTER_FIELDS`` order.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        self.layers = list(layers)
        self.armed = False
        self._activations: dict[str, torch.Tensor] = {}
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None  # flat weights and their row norms
        self._segment_cache: tuple | None = None
        self._handles: list = []

    def attach(self) -> None:
        self.detach()
        for name, module in self.layers:
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        """Follow a structural change: new layer list, hooks re-attached, previous weights forgotten."""
        self.layers = list(layers)
        self._previous = None
        self._activations.clear()
        self.attach()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output) -> None:
            if self.armed and isinstance(output, torch.Tensor):
                self._activations[name] = channel_abs_mean(output, isinstance(module, nn.modules.conv._ConvNd))
        return record

    def arm(self) -> None:
        self.armed = True
        self._activations = {}

    @torch.no_grad()
    def measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``[5, F]`` tensor of per-filter fields and one ``[L]`` of per-layer ‖g‖/‖w‖.

        Every monitored weight (and gradient) is concatenated into one flat buffer — a filter's coefficients are
        contiguous in it — and each field is one ``segment_reduce`` over all filters of all layers: the number of
        kernels does not grow with the number of layers.
        """
        self.armed = False
        weights = torch.cat([module.weight.detach().reshape(-1) for _, module in self.layers]).float()
        grads = torch.cat([(module.weight.detach() if module.weight.grad is None else module.weight.grad.detach())
                           .reshape(-1) for _, module in self.layers]).float()
        row_lengths, layer_counts = self._segments(weights.device)
        frozen = [module.weight.grad is None for _, module in self.layers]
        grad_abs = torch.segment_reduce(grads.abs(), "sum", lengths=row_lengths)
        grad_sq = torch.segment_reduce(grads.square(), "sum", lengths=row_lengths)
        if any(frozen):  # no gradient (frozen): report zeros, not the weight values used as a placeholder above
            mask = torch.repeat_interleave(torch.tensor([not f for f in frozen], device=weights.device,
                                                        dtype=torch.float32), layer_counts)
            grad_abs, grad_sq = grad_abs * mask, grad_sq * mask
        weight_sq = torch.segment_reduce(weights.square(), "sum", lengths=row_lengths)
        weight_norm = weight_sq.sqrt()
        if self._previous is not None and self._previous[0].shape == weights.shape:
            change = torch.segment_reduce((weights - self._previous[0]).square(), "sum", lengths=row_lengths)
            update = change.sqrt() / self._previous[1].clamp_min(1e-12)
        else:
            update = torch.zeros_like(weight_norm)
        self._previous = (weights, weight_norm)  # ``weights`` is a fresh concatenation: nothing else writes to it
        activation = torch.cat([self._activations.get(name, torch.zeros(module.weight.shape[0], device=weights.device))
                                .float() for name, module in self.layers])
        lengths = row_lengths.float()
        filters = torch.stack([grad_abs / lengths, grad_sq / lengths, weight_norm, update, activation])
        layer_ratio = (torch.segment_reduce(grad_sq, "sum", lengths=layer_counts) /
                       torch.segment_reduce(weight_sq, "sum", lengths=layer_counts).clamp_min(1e-24)).sqrt()
        self._activations = {}
        return filters, layer_ratio

    def _segments(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients per filter and filters per layer, as index tensors on ``device`` (made once per shape)."""
        shapes = tuple(tuple(module.weight.shape) for _, module in self.layers)
        if self._segment_cache is None or self._segment_cache[0] != (shapes, device):
            rows = [int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1 for shape in shapes]
            row_lengths = torch.tensor([row for row, shape in zip(rows, shapes) for _ in range(shape[0])],
                                       device=device)
            layer_counts = torch.tensor([shape[0] for shape in shapes], device=device)
            self._segment_cache = ((shapes, device), row_lengths, layer_counts)
        return self._segment_cache[1], self._segment_cache[2]


def tensor_stats(tensor: torch.Tensor) -> torch.Tensor:
    """DeepTracker's statistics of one tensor, in ``STAT_FIELDS`` order, as a float32 device vector."""
    flat = tensor.detach().reshape(-1).float()
    if flat.numel() == 0:
        return torch.zeros(len(STAT_FIELDS), device=flat.device)
    sample = flat if flat.numel() <= _QUANTILE_LIMIT else flat[:: flat.numel() // _QUANTILE_LIMIT + 1]
    quartiles = torch.quantile(sample, torch.tensor([0.25, 0.5, 0.75], device=flat.device))
    count = torch.tensor(float(flat.numel()), device=flat.device)
    return torch.stack([
        flat.min(), flat.max(), flat.mean(), quartiles[1], quartiles[0], quartiles[2],
        flat.std(correction=0), flat.abs().sum(), torch.linalg.vector_norm(flat), (flat != 0).sum().float(), count,
    ])


def filter_change(current: torch.Tensor, previous: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per filter (row): cosine(current, previous) and ‖current − previous‖ / ‖previous‖ (1 and 0 without history)."""
    current = current.detach().reshape(current.shape[0], -1).float()
    if previous is None or previous.shape != current.shape:
        return torch.ones(current.shape[0], device=current.device), torch.zeros(current.shape[0],
                                                                                device=current.device)
    cosine = F.cosine_similarity(current, previous, dim=1, eps=1e-12)
    delta = torch.linalg.vector_norm(current - previous, dim=1) / torch.linalg.vector_norm(previous, dim=1).clamp_min(
        1e-12)
    return cosine, delta


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


def probe_pass(module: nn.Module, layers: Sequence[tuple[str, nn.Module]], images: torch.Tensor,
               labels: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of every monitored layer on the probe images, and the gradient of the probe loss w.r.t. them.

    Runs in eval mode (BatchNorm statistics and dropout untouched) and differentiates only with respect to the
    activations, so no parameter's ``.grad`` changes. The loss is the cross-entropy with ``labels`` (or the sum of
    the logits when there are none).
    """
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                outputs[name] = output
        return hook

    handles = [layer.register_forward_hook(keep(name)) for name, layer in layers]
    try:
        with eval_mode(module), torch.enable_grad():
            images = images.detach().clone().requires_grad_(True)
            logits = module(images)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"forward returned {type(logits).__name__}, not a tensor of logits")
            loss = (F.cross_entropy(logits, labels) if labels is not None and logits.dim() == 2
                    else logits.float().sum())
            names = [name for name in outputs if outputs[name].requires_grad]
            grads = torch.autograd.grad(loss, [outputs[name] for name in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    activations = {name: output.detach() for name, output in outputs.items()}
    activation_grads = {name: (grad if grad is not None else torch.zeros_like(outputs[name])).detach()
                        for name, grad in zip(names, grads)}
    return activations, activation_grads
