"""One asynchronous device→host copy per published message.

The training thread packs every tensor a message needs into one flat float32 buffer on the device and starts one
non-blocking copy into pinned host memory; the I/O thread turns it into numpy arrays once the copy's CUDA event has
completed (it polls ``Event.query``, so no thread ever blocks the device). On CPU the packed buffer is already a
fresh host tensor and is ready at once. Values that are already on the host as numpy arrays (scalars read from CPU
tensors) travel beside the buffer as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from revacnn.telemetry.probes import flatten
from revacnn.wire.protocol import Message


class PendingArrays:
    """Named arrays being copied to the host as one flat float32 buffer."""

    def __init__(self, host: torch.Tensor | None, layout: list[tuple[str, tuple[int, ...], int]],
                 event: torch.cuda.Event | None, on_host: dict[str, np.ndarray] | None = None) -> None:
        self._host = host
        self._layout = layout
        self._event = event
        self._on_host = on_host or {}

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = dict(self._on_host)
        if self._host is None:
            return arrays
        flat = self._host.numpy()
        offset = 0
        for name, shape, count in self._layout:
            arrays[name] = flat[offset:offset + count].reshape(shape)
            offset += count
        return arrays


class HostCopy:
    """Collects device tensors for one message; ``launch`` packs them and starts the single copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, torch.Tensor]] = []
        self._on_host: dict[str, np.ndarray] = {}

    def add(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        """A device tensor joins the packed copy; a numpy array is already on the host and is passed on as it is."""
        if isinstance(tensor, np.ndarray):
            self._on_host[name] = tensor
        else:
            self._parts.append((name, tensor.detach()))

    def __bool__(self) -> bool:
        return bool(self._parts or self._on_host)

    def launch(self) -> PendingArrays:
        if not self._parts:
            return PendingArrays(None, [], None, self._on_host)
        device = self._parts[0][1].device
        layout = [(name, tuple(tensor.shape), tensor.numel()) for name, tensor in self._parts]
        tensors = [tensor if tensor.device == device else tensor.to(device) for _, tensor in self._parts]
        flat = flatten(tensors).float()
        if flat.device.type == "cuda":
            host = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return PendingArrays(host, layout, event, self._on_host)
        if flat.device.type != "cpu":  # other accelerators: a plain copy (their async semantics differ)
            return PendingArrays(flat.cpu(), layout, None, self._on_host)
        return PendingArrays(flat, layout, None, self._on_host)


class PendingMessage:
    """A telemetry message whose arrays are in flight; ``finalize(body, arrays)`` fills body fields from them."""

    def __init__(self, kind: str, body: dict[str, Any], pending: PendingArrays,
                 finalize: Callable[[dict[str, Any], dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
                 ) -> None:
        self.type = kind
        self._body = body
        self._pending = pending
        self._finalize = finalize

    def ready(self) -> bool:
        return self._pending.ready()

    def resolve(self) -> Message:
        arrays = self._pending.arrays()
        body = dict(self._body)
        if self._finalize is not None:
            arrays = self._finalize(body, arrays)
        return Message(self.type, body, arrays)
