"""One asynchronous device→host copy per published message.

The training thread packs every tensor a message needs into one flat float32 buffer on the device and starts one
non-blocking copy into pinned host memory; the I/O thread turns it into numpy arrays once the copy's CUDA event has
completed (it polls ``Event.query``, so no thread ever blocks the device). On CPU the packed buffer is already a
fresh host tensor and is ready at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from revacnn.protocol import Message


class PendingArrays:
    """Named arrays being copied to the host as one flat float32 buffer."""

    def __init__(self, host: torch.Tensor | None, layout: list[tuple[str, tuple[int, ...], int]],
                 event: torch.cuda.Event | None) -> None:
        self._host = host
        self._layout = layout
        self._event = event

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def arrays(self) -> dict[str, np.ndarray]:
        if self._host is None:
            return {}
        flat = self._host.numpy()
        arrays, offset = {}, 0
        for name, shape, count in self._layout:
            arrays[name] = flat[offset:offset + count].reshape(shape)
            offset += count
        return arrays


class HostCopy:
    """Collects device tensors for one message; ``launch`` packs them and starts the single copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, torch.Tensor]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._parts.append((name, tensor.detach()))

    def __bool__(self) -> bool:
        return bool(self._parts)

    def launch(self) -> PendingArrays:
        if not self._parts:
            return PendingArrays(None, [], None)
        device = self._parts[0][1].device
        layout = [(name, tuple(tensor.shape), tensor.numel()) for name, tensor in self._parts]
        flat = torch.cat([tensor.reshape(-1).to(device=device, dtype=torch.float32) for _, tensor in self._parts])
        if flat.device.type == "cuda":
            host = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return PendingArrays(host, layout, event)
        if flat.device.type != "cpu":  # other accelerators: a plain copy (their async semantics differ)
            return PendingArrays(flat.cpu(), layout, None)
        return PendingArrays(flat, layout, None)


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
