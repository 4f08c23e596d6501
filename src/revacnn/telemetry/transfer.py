"""One asynchronous device→host copy per published message.

The training thread packs every tensor a message needs into one flat float32 buffer on the device and starts one
non-blocking copy into pinned host memory; the I/O thread turns it into numpy arrays once the copy's CUDA event has
completed (it polls ``Event.query``, so no thread ever blocks the device). On CPU the packed buffer is already a
fresh host tensor and is ready at once. Values that are already on the host as numpy arrays (scalars read from CPU
tensors) travel beside the buffer as they are. A caller that packed some tensors itself, into a float32 buffer it
keeps (a snapshot's weights, compared with at the next snapshot), hands that buffer over whole (``add_packed``): on
CPU it is sent as it is, so the message and the caller share its memory instead of each holding a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from revacnn.telemetry.probes import flatten
from revacnn.wire.protocol import Message


Layout = list[tuple[str, tuple[int, ...], int]]   # (name, shape, element count) of each tensor in a flat buffer


class PendingArrays:
    """Named arrays being copied to the host as flat float32 buffers (one, or a few handed over already packed)."""

    def __init__(self, blocks: list[tuple[torch.Tensor, Layout]], event: torch.cuda.Event | None,
                 on_host: dict[str, np.ndarray] | None = None, order: list[str] | None = None) -> None:
        self._blocks = blocks
        self._event = event
        self._on_host = on_host or {}
        self._order = order      # the packed arrays' names in the order they were added (blocks interleave them)

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def arrays(self) -> dict[str, np.ndarray]:
        packed = {}
        for host, layout in self._blocks:
            flat = host.numpy()
            offset = 0
            for name, shape, count in layout:
                packed[name] = flat[offset:offset + count].reshape(shape)
                offset += count
        arrays = dict(self._on_host)
        arrays.update((name, packed[name]) for name in self._order or packed)
        return arrays


class HostCopy:
    """Collects device tensors for one message; ``launch`` packs them and starts the single copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, torch.Tensor]] = []
        self._packed: list[tuple[torch.Tensor, Layout]] = []
        self._order: list[str] = []
        self._on_host: dict[str, np.ndarray] = {}

    def add(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        """A device tensor joins the packed copy; a numpy array is already on the host and is passed on as it is."""
        if isinstance(tensor, np.ndarray):
            self._on_host[name] = tensor
        else:
            self._parts.append((name, tensor.detach()))
            self._order.append(name)

    def add_packed(self, flat: torch.Tensor, layout: Layout) -> None:
        """Tensors the caller has packed into ``flat`` (float32, 1-D, ``layout``'s tensors back to back) join the
        message without being packed again. On CPU the message's arrays are views of ``flat``: the caller may keep
        it, and must never write to it (the I/O thread and the recorder read it until the message is written)."""
        if flat.dtype != torch.float32 or flat.dim() != 1 or flat.numel() != sum(count for _, _, count in layout):
            raise ValueError("add_packed takes a 1-D float32 buffer holding exactly its layout's tensors")
        self._packed.append((flat.detach(), list(layout)))
        self._order.extend(name for name, _, _ in layout)

    def __bool__(self) -> bool:
        return bool(self._parts or self._packed or self._on_host)

    def launch(self) -> PendingArrays:
        blocks = list(self._packed)
        if self._parts:
            device = self._parts[0][1].device
            layout = [(name, tuple(tensor.shape), tensor.numel()) for name, tensor in self._parts]
            tensors = [tensor if tensor.device == device else tensor.to(device) for _, tensor in self._parts]
            blocks.append((flatten(tensors).float(), layout))
        if not blocks:
            return PendingArrays([], None, self._on_host)
        order = self._order if self._packed else None
        if any(flat.device.type == "cuda" for flat, _ in blocks):
            on_host = []
            for flat, layout in blocks:
                host = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=flat.device.type == "cuda")
                host.copy_(flat, non_blocking=True)
                on_host.append((host, layout))
            event = torch.cuda.Event()
            event.record()
            return PendingArrays(on_host, event, self._on_host, order)
        # other accelerators: a plain copy (their async semantics differ); CPU buffers are sent as they are
        return PendingArrays([(flat.cpu(), layout) for flat, layout in blocks], None, self._on_host, order)


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
