"""``CpuLedger``: the CPU time a background thread (the publisher's I/O thread, the recorder's writer) spent on each
type of message, for the callback's overhead budget (``telemetry.budget``). No torch."""

from __future__ import annotations

import time
from collections.abc import Iterable


class CpuLedger:
    """CPU seconds by message type, charged by one thread and read by another (a dict of floats: each read and
    update is atomic under the GIL)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    def charge(self, kind: str, seconds: float) -> None:
        self._seconds[kind] = self._seconds.get(kind, 0.0) + seconds

    def charge_shares(self, shares: dict[str, float], seconds: float) -> None:
        """Charge ``seconds`` of work done for several types at once, in proportion to ``shares`` (e.g. bytes)."""
        total = sum(shares.values())
        if total > 0:
            for kind, share in shares.items():
                self.charge(kind, seconds * share / total)

    def seconds(self, kinds: Iterable[str]) -> float:
        return sum(self._seconds.get(kind, 0.0) for kind in kinds)


thread_cpu = time.thread_time   # this thread's CPU seconds (the clock every charge is measured with)
