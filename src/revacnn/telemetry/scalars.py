"""Per-step scalars: read at the step, published in batches (the ``steps`` message of docs/protocol.md §4).

Every step's loss, logged metrics and hyper-parameters are taken when the step ends — device values stacked on the
device into one small tensor, CPU values read as floats — but a message is built, copied and encoded only once per
batch of steps: for a small model the fixed cost of a message (the packing, the I/O thread's encoding and send) was
most of what the callback cost per step. A batch is closed when ``interval`` seconds have passed since the last one
was, when it holds ``max_rows`` steps, or when the callback publishes anything that must follow it in step order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import numpy as np
import torch

from revacnn.telemetry.transfer import HostCopy, PendingMessage


def pack_scalars(values: Iterable[tuple[Hashable, Any]]
                 ) -> tuple[list[Hashable], list[torch.Tensor], list[Hashable], list[float]]:
    """Split single-element values into device ones and host ones: ``(device names, device values, host names,
    host values)``. ``scalar_values`` reads them back from device names followed by host names.

    A tensor on the CPU is read where it is (host memory: ``item()`` neither copies nor waits for a
    device); tensors on an accelerator are kept as they are, to be stacked there (``stack_on_device``) into the
    message's single host copy. Host values never go to the device: a blocking upload would sync. Other values (not
    single numbers) are left out. No torch operation runs here: on a GPU each one is a launch's worth of CPU time,
    and a ``steps`` message stacks the values of all its rows at once.
    """
    names, on_device, host_names, on_host = [], [], [], []
    for name, value in values:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            if value.device.type == "cpu":
                host_names.append(name)
                on_host.append(value.item())
            else:
                names.append(name)
                on_device.append(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            host_names.append(name)
            on_host.append(float(value))
    return names, on_device, host_names, on_host


@torch.no_grad()
def stack_on_device(values: list[torch.Tensor]) -> torch.Tensor:
    """Single-element device tensors as one float32 vector: one stack on the first one's device (others are moved
    there, as values on several accelerators are), so a single launch on a GPU. Mixed dtypes meet by type
    promotion, then float32. The stack is a copy: a value updated in place later does not change it."""
    device = values[0].device
    flat = [value.reshape(()) if value.dim() else value for value in values]
    if any(value.device != device for value in flat):
        flat = [value.to(device) for value in flat]
    return torch.stack(flat).float()


def add_scalars(copy: HostCopy, values: Iterable[tuple[Hashable, Any]]) -> list[Hashable]:
    """Put the single-element values into ``copy`` (arrays ``scalars`` and ``host_scalars``); returns their names
    in the order ``scalar_values`` reads them back."""
    device_names, on_device, host_names, on_host = pack_scalars(values)
    if on_device:
        copy.add("scalars", stack_on_device(on_device))
    if on_host:
        copy.add("host_scalars", np.array(on_host, np.float32))
    return device_names + host_names


def scalar_values(names: list[Hashable], arrays: dict[str, np.ndarray], not_finite: set[Hashable] | None = None
                  ) -> dict[Hashable, float | None]:
    """Name → value of what ``add_scalars`` packed, taken out of ``arrays``; NaN and ±inf become None (the wire's
    nil), and their names are added to ``not_finite`` when one is given: nil alone would not tell a diverged loss
    from a step that returned none."""
    parts = [arrays.pop(key) for key in ("scalars", "host_scalars") if key in arrays]
    if not parts:
        return {}
    values = np.concatenate(parts) if len(parts) > 1 else parts[0]
    read = {}
    for name, value in zip(names, values.tolist()):
        if math.isfinite(value):
            read[name] = value
        else:
            read[name] = None
            if not_finite is not None:
                not_finite.add(name)
    return read


class StepBatch:
    """The steps read since the last ``steps`` message; ``add`` one per step, ``flush`` publishes them as one.

    ``publish`` takes the ``PendingMessage``; ``drops`` returns the drop counters the message carries.
    """

    def __init__(self, publish: Callable[[PendingMessage], Any], drops: Callable[[], dict[str, int]],
                 interval: float = 0.1, max_rows: int = 64) -> None:
        self.publish = publish
        self.drops = drops
        self.interval = interval
        self.max_rows = max_rows
        self._rows: list[tuple[dict[str, Any], list[Hashable], torch.Tensor | None, list[Hashable], list[float]]] = []
        self._last_flush = -math.inf

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: dict[str, Any], values: Iterable[tuple[str, Any]], now: float) -> None:
        """One step: ``row`` holds its plain fields, ``values`` its scalars (loss and metrics); ``now`` is
        ``time.perf_counter()``. Publishes the batch when it is due."""
        # Stacked now, not at the flush: the stack copies the values as they are at this step.
        device_names, on_device, host_names, on_host = pack_scalars(values)
        self._rows.append((row, device_names, stack_on_device(on_device) if on_device else None, host_names, on_host))
        if len(self._rows) >= self.max_rows or now - self._last_flush >= self.interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Publish the steps held, if any, as one ``steps`` message."""
        self._last_flush = time.perf_counter() if now is None else now
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        copy = HostCopy()
        device_names: list[Hashable] = []
        host_names: list[Hashable] = []
        device_parts, host_values = [], []
        for index, (_, row_device_names, on_device, row_host_names, on_host) in enumerate(rows):
            device_names += [(index, name) for name in row_device_names]
            host_names += [(index, name) for name in row_host_names]
            if on_device is not None:
                device_parts.append(on_device)
            host_values += on_host
        if device_parts:
            copy.add("scalars", torch.cat(device_parts) if len(device_parts) > 1 else device_parts[0])
        if host_values:
            copy.add("host_scalars", np.array(host_values, np.float32))
        names = device_names + host_names
        bodies = [row[0] for row in rows]
        drops = self.drops

        def finalize(body: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = [dict(row, loss=None, metrics={}) for row in bodies]
            not_finite: set[Hashable] = set()
            for (index, name), value in scalar_values(names, arrays, not_finite).items():
                if name == "loss":
                    out[index]["loss"] = value
                else:
                    out[index]["metrics"][name] = value
            for index, name in sorted(not_finite, key=str):
                out[index].setdefault("not_finite", []).append(name)
            body["rows"] = out
            body["drops"] = drops()
            return arrays

        self.publish(PendingMessage("steps", {"first": bodies[0]["step"], "last": bodies[-1]["step"]},
                                    copy.launch(), finalize))
