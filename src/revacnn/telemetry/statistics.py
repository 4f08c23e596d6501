"""Snapshot statistics of whole tensors, on their device: DeepTracker's per-tensor statistics (``STAT_FIELDS``) and
each filter's change since the last snapshot."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from revacnn.telemetry.probes import to_device
from revacnn.wire.protocol import STAT_FIELDS

QUARTILE_SAMPLE = 1 << 16   # tensors larger than this take their quartiles from a fixed sample of this many values
_sample_indices: dict[tuple[int, torch.device], torch.Tensor] = {}


def tensor_stats(tensor: torch.Tensor) -> torch.Tensor:
    """DeepTracker's statistics of one tensor, in ``STAT_FIELDS`` order, as a float32 vector on its device.

    Every statistic but the quartiles is exact (float32 reductions, on the device). Quartiles interpolate linearly
    (``torch.quantile``'s default) over the whole tensor up to ``QUARTILE_SAMPLE`` values, and over a fixed random
    sample of that many values above it — their standard error is then about 0.5 % of the tensor's standard
    deviation, invisible in a box plot, while sorting every weight and gradient of a ResNet-50 took 2 s of each
    snapshot on a CPU. The sample is the same positions at every snapshot, so quartiles of one layer are comparable
    over time. Nothing is read back to the host.
    """
    flat = tensor.detach().reshape(-1).float()
    if flat.numel() == 0:
        return torch.zeros(len(STAT_FIELDS), device=flat.device)
    sample = quartile_sample(flat)
    if flat.device.type == "cpu":  # numpy's sort of a small array costs a fraction of torch's
        quartiles = torch.from_numpy(_quartiles_numpy(sample.numpy()).astype(np.float32))
    else:
        quartiles = _quartiles_torch(sample)
    minimum, maximum = torch.aminmax(flat)
    variance, mean = torch.var_mean(flat, correction=0)
    count = torch.full((), float(flat.numel()), device=flat.device)
    return torch.stack([
        minimum, maximum, mean, quartiles[1], quartiles[0], quartiles[2], variance.sqrt(), flat.abs().sum(),
        torch.linalg.vector_norm(flat), torch.count_nonzero(flat).float(), count,
    ])


def quartile_sample(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` itself up to ``QUARTILE_SAMPLE`` values; above, the values at a fixed random set of that many
    positions (seeded, sorted for locality, made and uploaded once per size and device)."""
    size = flat.numel()
    if size <= QUARTILE_SAMPLE:
        return flat
    key = (size, flat.device)
    indices = _sample_indices.get(key)
    if indices is None:
        if len(_sample_indices) >= 512:  # bounded: a model has a few hundred distinct layer sizes at most
            _sample_indices.clear()
        chosen = np.sort(np.random.default_rng(size).choice(size, QUARTILE_SAMPLE, replace=False))
        indices = _sample_indices[key] = to_device(chosen, flat.device)
    return flat[indices]


def _quartiles_torch(sample: torch.Tensor) -> torch.Tensor:
    """The 0.25, 0.5 and 0.75 quantiles of ``sample`` with linear interpolation, on its device, from one sort and
    reads at indices known from the size (``torch.quantile`` needs its quantiles as a device tensor: an upload)."""
    ordered = torch.sort(sample).values
    last = ordered.numel() - 1
    quartiles = []
    for q in (0.25, 0.5, 0.75):
        position = q * last
        low = math.floor(position)
        high = min(low + 1, last)
        quartiles.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    return torch.stack(quartiles)


def _quartiles_numpy(values: np.ndarray) -> np.ndarray:
    """The 0.25, 0.5 and 0.75 quantiles with linear interpolation (as ``torch.quantile``), from one sort."""
    position = np.array([0.25, 0.5, 0.75]) * (values.size - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, values.size - 1)
    ordered = np.sort(values)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


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
