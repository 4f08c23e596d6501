"""Quantities: what is measured on the device, per monitored layer and per filter (docs/protocol.md §4).

Every function here returns device tensors and never reads a value back to the host; the callback decides when
each quantity is due and packs the results into one host copy (``revacnn.telemetry.transfer``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

MONITORED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


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
        layers = [name for name, sub in module.named_modules() if isinstance(sub, MONITORED_TYPES)]
        hint = f" (its Conv2d and Linear layers: {', '.join(layers[:12])}{', …' if len(layers) > 12 else ''})"
        raise ValueError(f"monitored layers not found in {type(module).__name__}: {', '.join(sorted(missing))}"
                         f"{hint if layers else ''}")
    without_weight = [name for name, sub in found if not isinstance(getattr(sub, "weight", None), torch.Tensor)]
    if without_weight:
        raise ValueError(f"monitored layers need a weight tensor: {', '.join(without_weight)}")
    return found


def filters_first(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (``module``'s weight or its gradient) with one row per filter, i.e. per output channel, on dim 0.

    Conv and Linear layers keep their weight that way already: it is returned as it is. A transposed conv keeps its
    weight as ``[in, out / groups, …]``, where output channel ``g · out / groups + j`` is
    ``weight[g · in / groups : (g + 1) · in / groups, j]``; it is regrouped to ``[out, in / groups, …]`` (a copy),
    the shape a conv of the same channels would have.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return tensor.unflatten(0, (module.groups, -1)).transpose(1, 2).flatten(0, 1)
    return tensor


def filter_count(module: nn.Module) -> int:
    """How many filters (output channels) a monitored layer has."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return int(module.weight.shape[1] * module.groups)
    return int(module.weight.shape[0])


def channel_abs_sum(output: torch.Tensor, channels_first: bool) -> tuple[torch.Tensor, int]:
    """Σ |activation| per output channel in float32, and how many values each channel's sum adds up: channels on
    dim 1 for conv outputs (N, C, …), on the last dim otherwise. The mean is the one divided by the other.

    Off the CPU this is one kernel that reads the activation once (an L1 norm per channel); ``abs().mean()`` would
    write and read an |activation| tensor as large as the activation (three times the memory traffic, two launches),
    which on a GPU is the larger part of what per-filter data costs a large model (benchmarks/RESULTS.md, GPU). On the CPU the two-pass form is the
    faster one (the L1 norm over non-contiguous dims is 1.5–2.5× slower there), summing each map's contiguous
    spatial values before the images (45 µs instead of 227 µs for 16 images of 16 maps of 28×28, on 2 threads).
    """
    output = output.detach()
    if channels_first and output.dim() > 2:
        dims = [0, *range(2, output.dim())]
        channels = output.shape[1]
    else:
        output = output.reshape(-1, output.shape[-1])
        dims = [0]
        channels = output.shape[1]
    count = output.numel() // channels if channels else 0
    if output.device.type == "cpu":
        if len(dims) > 1:  # the contiguous spatial dims first, then the images: ~5× faster than one pass over both
            return output.abs().sum(dim=dims[1:], dtype=torch.float32).sum(0), count
        return output.abs().sum(dim=dims, dtype=torch.float32), count
    return torch.linalg.vector_norm(output, 1, dim=dims, dtype=torch.float32), count


SMALL_MODEL_COEFFICIENTS = 65_536


def default_strategy(device: torch.device, coefficients: int) -> str:
    """``"segments"`` off the CPU, and on it for models of at most ``SMALL_MODEL_COEFFICIENTS`` monitored weights,
    where each torch call's fixed cost outweighs the copy into one buffer (the demo CNN's 22,400: 0.48 ms against
    0.72 ms per measurement on 2 threads); ``"layers"`` for larger ones on the CPU (a 694k-weight ResNet: 3.3 ms
    against 6.3 ms, and the gap grows with the size)."""
    return "segments" if device.type != "cpu" or coefficients <= SMALL_MODEL_COEFFICIENTS else "layers"


class FilterProbe:
    """Per-filter statistics of a step: gradient, weight, update since the previous measurement, activation.

    ``arm()`` before the forward pass makes the forward hooks record mean |activation| per channel; ``measure()``
    after back-propagation returns ``([5, F] filters, [L] layer ‖g‖/‖w‖)`` in ``FILTER_FIELDS`` order.

    ``activation_images``: the mean |activation| is taken over the first this many images of each batch (None: all
    of them). ReVACNN defines a path's strength on an input image; a fixed sample keeps the hooks' cost independent
    of the batch size (at batch 256 on a GPU, reading every activation map again is most of what per-filter data
    costs), and the first images of a shuffled batch are as random as any.

    ``strategy`` picks how per-filter sums are reduced: ``"segments"`` (every layer's terms in one flat buffer,
    reduced per filter by ``segment_reduce`` — a constant number of kernels, what a GPU wants, since launches dominate
    there — or on the CPU by a sum per layer, ``_filter_sums``)
    or ``"layers"`` (a few row reductions per layer on its own weight and gradient, nothing concatenated: on a CPU
    every op runs synchronously, so the launch count does not matter and the copies do — on a ResNet-50 it takes
    ~30 ms where one flat buffer reduced by ``numpy.add.reduceat`` took 1.8 s and 1.4 GB). The default chooses by
    the weights' device and size (``default_strategy``).
    """

    STRATEGIES = ("segments", "layers")

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], strategy: str | None = None,
                 activation_images: int | None = None) -> None:
        if strategy is not None and strategy not in self.STRATEGIES:
            raise ValueError(f"strategy must be one of {self.STRATEGIES} or None, got {strategy!r}")
        if activation_images is not None and (isinstance(activation_images, bool) or activation_images < 1):
            raise ValueError(f"activation_images must be a positive integer or None, got {activation_images!r}")
        self.layers = list(layers)
        self.strategy = strategy
        self.activation_images = activation_images
        self.armed = False
        # Per layer: Σ |activation| per channel over the forwards since ``arm``, each call's sum scaled to the first
        # call's count of values per channel; that count; the number of calls. The mean of the calls' means is
        # Σ / (count · calls), divided out once for every layer in ``measure``.
        self._activations: dict[str, list] = {}
        self._per_filter_cache: dict[tuple, torch.Tensor] = {}
        # The weights at the previous measurement (a copy: the update ratio compares with them) and their per-filter
        # norms: one flat buffer for "segments", one tensor per layer for "layers".
        self._previous: tuple[Any, torch.Tensor] | None = None
        self._held: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # weight, grad as their optimizer stepped
        self._segment_cache: tuple | None = None
        self._handles: list = []
        self.hook_seconds = 0.0   # time the forward hooks spent reducing activations since ``measure`` last read it

    def attach(self) -> None:
        self.detach()
        for name, module in self.layers:
            # prepended: the layer's own output, before the layers insert_layer put after it (steering/insertion.py)
            self._handles.append(module.register_forward_hook(self._hook(name), prepend=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        """Follow a structural change: new layer list, hooks re-attached, previous weights forgotten."""
        self.layers = list(layers)
        self._previous = None
        self._activations = {}
        self._held = {}
        self.attach()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output) -> None:
            if not (self.armed and isinstance(output, torch.Tensor)):
                return
            start = time.perf_counter()
            if self.activation_images is not None and output.dim() > 1:
                output = output[:self.activation_images]
            total, count = channel_abs_sum(output, isinstance(module, nn.modules.conv._ConvNd))
            entry = self._activations.get(name)
            if entry is None:
                self._activations[name] = [total, count, 1]
            else:  # a layer used twice, or the batches of an accumulated gradient: the mean of their means
                entry[0] = entry[0] + (total if count == entry[1] else total * (entry[1] / max(count, 1)))
                entry[2] += 1
            self.hook_seconds += time.perf_counter() - start
        return record

    def arm(self) -> None:
        """Record activations from now until ``measure``: every forward through a layer, averaged."""
        self.armed = True
        self._activations = {}
        self._held = {}

    @torch.no_grad()
    def hold(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the weight and gradient of every layer ``optimizer`` is about to step, for the next ``measure``.

        For modules that step several optimizers in one batch (a GAN's discriminator and generator): each layer is
        then measured as its own optimizer saw it, not with the gradient another optimizer's step found there.
        The first hold of a layer in a step counts."""
        stepped = {id(param) for group in optimizer.param_groups for param in group["params"]}
        for name, module in self.layers:
            weight = module.weight
            if id(weight) in stepped and name not in self._held:
                self._held[name] = (weight.detach().clone(), None if weight.grad is None else weight.grad.detach().clone())

    @property
    def holding(self) -> bool:
        return bool(self._held)

    @torch.no_grad()
    def measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``[5, F]`` tensor of per-filter fields and one ``[L]`` of per-layer ‖g‖/‖w‖, on the weights' device."""
        self.armed = False
        pairs = [self._held.get(name) or (module.weight.detach(), module.weight.grad) for name, module in self.layers]
        self._held = {}
        # (weight, gradient or None when frozen), one row per filter; a frozen layer's gradient fields are zeros
        by_filter = [(filters_first(module, weight), None if grad is None else filters_first(module, grad.detach()))
                     for (_, module), (weight, grad) in zip(self.layers, pairs)]
        entries = [self._activations.get(name) for name, _ in self.layers]
        self._activations = {}
        device = by_filter[0][0].device if by_filter else torch.device("cpu")
        strategy = self.strategy or default_strategy(device, sum(weight.numel() for weight, _ in by_filter))
        if strategy == "layers":
            return self._measure_layers(by_filter, entries)
        return self._measure_segments(by_filter, entries)

    def _measure_layers(self, by_filter: list[tuple[torch.Tensor, torch.Tensor | None]], entries: list
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's rows reduced on its own tensors (float32 accumulation), into one preallocated ``[5, F]``."""
        rows = [weight.shape[0] for weight, _ in by_filter]
        device = by_filter[0][0].device if by_filter else torch.device("cpu")
        filters = torch.zeros((5, sum(rows)), device=device, dtype=torch.float32)
        layer_ratio = torch.zeros(len(rows), device=device, dtype=torch.float32)
        previous = self._previous
        if previous is not None and [tuple(p.shape) for p in previous[0]] != [tuple(w.shape) for w, _ in by_filter]:
            previous = None
        kept, start = [], 0
        for index, ((weight, grad), count) in enumerate(zip(by_filter, rows)):
            end = start + count
            w = as_reducible(weight.reshape(count, -1))
            coefficients = max(w.shape[1], 1)
            weight_norm = torch.linalg.vector_norm(w, 2, dim=1, dtype=torch.float32)
            filters[2, start:end] = weight_norm
            if grad is not None:
                g = as_reducible(grad.reshape(count, -1))
                torch.div(g.abs().sum(1, dtype=torch.float32), coefficients, out=filters[0, start:end])
                grad_sq = torch.linalg.vector_norm(g, 2, dim=1, dtype=torch.float32).square_()
                torch.div(grad_sq, coefficients, out=filters[1, start:end])
                layer_ratio[index] = (grad_sq.sum() / weight_norm.square().sum().clamp_min(1e-24)).sqrt()
            if previous is not None:  # the kept copy becomes w_prev − w, its norm is read, then it becomes w
                before = previous[0][index].view(count, -1)
                torch.linalg.vector_norm(before.sub_(w), 2, dim=1, out=filters[3, start:end])
                filters[3, start:end].div_(previous[1][start:end].clamp_min(1e-12))
                before.copy_(w)
                kept.append(previous[0][index])
            else:
                kept.append(weight.detach().to(torch.float32, copy=True))
            entry = entries[index]
            if entry is not None:
                torch.div(entry[0], max(entry[1] * entry[2], 1), out=filters[4, start:end])
            start = end
        self._previous = (kept, filters[2].clone())
        return filters, layer_ratio

    def _measure_segments(self, by_filter: list[tuple[torch.Tensor, torch.Tensor | None]], entries: list
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every monitored weight and gradient concatenated into one flat buffer (a filter's coefficients are
        contiguous in it, and the copy of the weights is kept for the next update ratio); the four summed terms
        |g|, g², w², (w − w_prev)² of every coefficient go into one ``[4, N]`` buffer reduced per filter."""
        weights = flatten([weight for weight, _ in by_filter]).float()
        grads = flatten([weight if grad is None else grad for weight, grad in by_filter]).float()
        segments = self._segments([weight.shape for weight, _ in by_filter], weights.device)
        previous = self._previous
        if previous is None or not isinstance(previous[0], torch.Tensor) or previous[0].shape != weights.shape:
            previous = None
        frozen = [grad is None for _, grad in by_filter]
        grad_mask = self._per_filter([0.0 if f else 1.0 for f in frozen], segments, weights.device) \
            if any(frozen) else None
        activations = [None if entry is None else entry[0] for entry in entries]
        divisor = self._per_filter([1 if entry is None else max(entry[1] * entry[2], 1) for entry in entries],
                                   segments, weights.device)
        filters, layer_ratio, weight_norm = self._reduce_segments(weights, grads, previous, grad_mask, activations,
                                                                  divisor, segments)
        self._previous = (weights, weight_norm)  # ``weights`` is a fresh concatenation: nothing else writes to it
        return filters, layer_ratio

    def _per_filter(self, per_layer: list[float], segments: "_Segments", device: torch.device) -> torch.Tensor:
        """One float32 value per layer, repeated for each of its filters, on ``device``: made and uploaded once per
        distinct value (the activations' divisors change with the batch size, the gradient mask when a layer is
        frozen or thawed), so a step's measurement uploads nothing."""
        key = (tuple(per_layer), tuple(segments.layer_rows), device)
        vector = self._per_filter_cache.get(key)
        if vector is None:
            if len(self._per_filter_cache) >= 16:  # bounded: an odd last batch per epoch, a few frozen sets
                self._per_filter_cache.clear()
            vector = to_device(np.repeat(np.array(per_layer, np.float32), segments.layer_rows), device)
            self._per_filter_cache[key] = vector
        return vector

    @staticmethod
    def _reduce_segments(weights: torch.Tensor, grads: torch.Tensor, previous: tuple | None,
                         grad_mask: torch.Tensor | None,
                         activations: list[torch.Tensor | None], divisor: torch.Tensor, segments: _Segments
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On any device, in torch: a fixed number of kernels however many layers there are."""
        device = weights.device
        terms = torch.empty((4, weights.numel()), device=device, dtype=torch.float32)
        torch.abs(grads, out=terms[0])
        torch.mul(grads, grads, out=terms[1])
        torch.mul(weights, weights, out=terms[2])
        if previous is not None:
            torch.sub(weights, previous[0], out=terms[3])
            terms[3].square_()
        else:
            terms[3].zero_()
        sums = _filter_sums(terms, segments)
        if grad_mask is not None:
            sums[:2] *= grad_mask
        grad_abs, grad_sq, weight_sq, change = sums
        weight_norm = weight_sq.sqrt()
        update = change.sqrt() / previous[1].clamp_min(1e-12) if previous is not None else torch.zeros_like(change)
        activation = torch.cat([torch.zeros(rows, device=device, dtype=torch.float32) if values is None else values
                                for values, rows in zip(activations, segments.layer_rows)]).div_(divisor)
        filters = torch.stack([grad_abs / segments.row_lengths_float, grad_sq / segments.row_lengths_float,
                               weight_norm, update, activation])
        per_layer = _layer_sums(sums[1:3], segments)
        return filters, (per_layer[0] / per_layer[1].clamp_min(1e-24)).sqrt(), weight_norm

    def _segments(self, weight_shapes: list[torch.Size], device: torch.device) -> _Segments:
        """Index tensors of the current (filters-first) weight shapes on ``device``, made once per shape."""
        shapes = tuple(tuple(shape) for shape in weight_shapes)
        if self._segment_cache is None or self._segment_cache[0] != (shapes, device):
            self._segment_cache = ((shapes, device), _Segments.of(shapes, device))
        return self._segment_cache[1]


def _filter_sums(terms: torch.Tensor, segments: "_Segments") -> torch.Tensor:
    """``[4, F]``: each filter's sum of the ``[4, N]`` terms over its coefficients.

    Off the CPU one ``segment_reduce`` (a constant number of kernels, however many layers). On the CPU a sum per
    layer over its block viewed ``[4, filters, coefficients]`` (a layer's filters have equal lengths): torch's CPU
    ``segment_reduce`` costs ~45 µs a call for the demo CNN's 22,400 weights, the four layers' sums ~4 µs each."""
    if terms.device.type != "cpu":
        # unsafe: the lengths are ours and valid; the checks it skips read them back to the host (a sync per call)
        return torch.segment_reduce(terms, "sum", lengths=segments.row_lengths_4, axis=1, unsafe=True)
    sums = torch.empty((4, segments.row_lengths_float.numel()), dtype=terms.dtype)
    start = first = 0
    for rows, coefficients in zip(segments.layer_rows, segments.layer_coefficients):
        end = start + rows * coefficients
        torch.sum(terms[:, start:end].view(4, rows, coefficients), dim=2, out=sums[:, first:first + rows])
        start, first = end, first + rows
    return sums


def _layer_sums(per_filter: torch.Tensor, segments: "_Segments") -> torch.Tensor:
    """``[2, L]``: each layer's sum of the ``[2, F]`` per-filter values. ``segment_reduce`` off the CPU (CUDA's
    ``index_add_`` adds in no fixed order, and refuses deterministic mode), ``index_add_`` on it (one call)."""
    if per_filter.device.type != "cpu":
        return torch.segment_reduce(per_filter, "sum", lengths=segments.layer_counts_2, axis=1, unsafe=True)
    return torch.zeros((2, len(segments.layer_rows)), dtype=per_filter.dtype).index_add_(1, segments.filter_layer,
                                                                                    per_filter)


class _Segments(NamedTuple):
    """How the flat buffer of every monitored weight splits into layers and filters."""

    layer_rows: list[int]              # filters per layer
    layer_coefficients: list[int]      # coefficients per filter, per layer
    filter_layer: torch.Tensor         # [F] the index of each filter's layer, for summing per layer on the CPU
    layer_counts_2: torch.Tensor       # [2, L] filters per layer, for reducing two per-filter fields per layer at once
    row_lengths_float: torch.Tensor    # [F] coefficients per filter
    row_lengths_4: torch.Tensor        # [4, F] coefficients per filter, for the four summed terms at once

    @classmethod
    def of(cls, shapes: Sequence[tuple[int, ...]], device: torch.device) -> "_Segments":
        rows = [math.prod(shape[1:]) for shape in shapes]
        lengths = np.array([row for row, shape in zip(rows, shapes) for _ in range(shape[0])], np.int64)
        layer_of_filter = np.repeat(np.arange(len(shapes), dtype=np.int64), [shape[0] for shape in shapes])
        counts = np.array([shape[0] for shape in shapes], np.int64)
        row_lengths, layer_counts = to_device(lengths, device), to_device(counts, device)
        return cls([shape[0] for shape in shapes], rows, to_device(layer_of_filter, device),
                   layer_counts.expand(2, -1).contiguous(), row_lengths.float(), row_lengths.expand(4, -1).contiguous())


def as_reducible(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when float32 reductions can read it as it is (float32 and the half types, which they widen),
    else a float32 copy (float64: a reduction may not narrow its input)."""
    return tensor if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) else tensor.float()


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' elements in one new flat tensor, one after the other (dtypes meet by type promotion).

    ``torch.cat`` of reshaped views computes the same, but with a Python call per tensor: on a GPU each costs about
    a kernel launch's worth of CPU time, so for a model's dozens of layers the per-step measurement would pay them
    in the step. This is one call into torch's C++ (the flattening DDP uses for its buckets). Always a copy, also of
    a single tensor (which that flattening would return as a view of it): the result is kept, and read later."""
    if len(tensors) == 1:
        return torch.cat([tensors[0].reshape(-1)])
    return torch._utils._flatten_dense_tensors(list(tensors))


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of ``values`` on ``device``, uploaded without waiting for the device: on CUDA through pinned memory,
    asynchronously (a plain ``torch.tensor(..., device=...)`` is a blocking copy, i.e. a host sync)."""
    host = torch.from_numpy(np.array(values, copy=True))
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
