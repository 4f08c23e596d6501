"""The overhead budget: how often per-filter data and snapshots are measured so that the callback costs at most a
given fraction of the training time, on this run, as measured while it trains (docs/telemetry.md, "Budget").

Costs are measured, never assumed:

- **on the training thread**, with a monotonic clock around each piece of work the callback does in a step: the
  per-step scalars, the per-filter measurement (its forward hooks, its reductions, publishing it) and snapshots
  (their statistics, probe pass and packed copy);
- **on the device**, where there is one: CUDA events around the same work, read once they have completed
  (``Event.query``: never a wait), since there launching is cheap and the kernels are what delays the step;
- **on the callback's background threads** (the I/O thread that serialises and sends, the recorder's thread that
  writes): the CPU time each spends on each message type (``CpuLedger``, ``time.thread_time``), per occurrence of
  the quantity that published it, one sample per planning window. On a machine with cores to spare this CPU time
  does not slow training; it is counted in full, which errs on the safe side on a small machine, where it does.

The training time a step would take without the callback is the median of recent steps' wall time minus the
callback's own time in them. Every ``replan_seconds`` the plan is made again:

    budget per step     B = 0.75 × fraction × bare step time: a quarter of the budget is left for what cannot
                        be timed per quantity (the GIL the background threads hold while the training thread
                        waits, the caches the callback's work evicts, Lightning calling the hooks) — on the demo
                        CNN the measured costs summed to 1.9–2.0 % where the throughput said 2.4 %
    scalars             as given (every step by default), never planned: the chart and the recording keep every
                        step's loss; their cost is taken from B first (at most half of it)
    per-filter data     every N steps: its cost per measurement ÷ N within 85 % of what the scalars leave (what the
                        dashboard shows live comes first), and not more often than the dashboard refreshes
                        (``refresh_seconds``, ~2 Hz); with a fixed snapshot cadence, within what those snapshots leave
    snapshots           every M steps: within the rest, and at most once every ``snapshot_seconds``

N and M are rounded up to 1, 2, 3, 5 × 10^k (readable, and a cadence does not flap between neighbours); a plan is
kept while it stays within the budget and not needlessly sparse (hysteresis). Only global rank 0 measures
telemetry, so under DDP the plan is rank 0's alone: no other rank needs it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

QUANTITIES = ("scalars", "filters", "snapshot")
# The messages each quantity publishes: a step with per-filter data is a ``step`` message, other steps are rows of
# ``steps`` messages.
MESSAGE_TYPES = {"scalars": ("steps",), "filters": ("step",), "snapshot": ("snapshot",)}
_FILTERS_SHARE = 0.85           # of what the scalars leave of the budget; snapshots get the rest (at least 15 %)
_PLANNED_SHARE = 0.75           # of the budget, planned; the rest is headroom for what is not timed (module doc)
_WARMUP_REFRESHES = 4          # per-filter data, while its cost rests on the first occurrence: at most this many
                               # dashboard refreshes apart
_LEFT_AFTER_SCALARS = 0.5       # of the planned budget, kept for per-filter data and snapshots however dear scalars are


def nice_at_least(value: float) -> int:
    """The smallest of 1, 2, 3, 5, 10, 20, 30, 50, … that is ≥ ``value`` (neighbours at most 2× apart)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 3, 5, 10):
        if factor * power >= value - 1e-9:
            return int(factor * power)
    return int(10 * power)


class DeviceTimer:
    """CUDA events around a piece of work; its device seconds are collected once the end event has completed."""

    def __init__(self) -> None:
        self._open: deque[tuple[str, Any, Any]] = deque()

    def start(self, device: torch.device | None) -> Any:
        if device is None or device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, quantity: str, start: Any) -> None:
        if start is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._open.append((quantity, start, end))
        while len(self._open) > 64:  # a device that never completes them must not grow this without bound
            self._open.popleft()

    def collect(self) -> list[tuple[str, float]]:
        """``(quantity, seconds)`` of the work whose events have completed, in order; never waits."""
        done = []
        while self._open and self._open[0][2].query():
            quantity, start, end = self._open.popleft()
            done.append((quantity, start.elapsed_time(end) / 1000.0))
        return done


class Samples:
    """A robust running cost: values are averaged over each planning window, and the estimate is the median of the
    last ``WINDOWS`` windows' averages, so one slow occurrence on a busy machine does not swing the plan (a quantity
    measured every few windows has one value per window: a blend would give a single stall half the weight), while
    a lasting change is followed within three windows. The first value ever stands alone until another arrives: it
    pays first-call costs (allocations, caches, lazy imports)."""

    WINDOWS = 5

    def __init__(self) -> None:
        self.seen = 0
        self._first: float | None = None
        self._sum = 0.0
        self._count = 0
        self._windows: deque[float] = deque(maxlen=self.WINDOWS)

    def add(self, value: float) -> None:
        if self.seen == 0:
            self._first = value
        else:
            self._sum += value
            self._count += 1
        self.seen += 1

    def add_to_last(self, value: float) -> None:
        if self._count:
            self._sum += value
        elif self._first is not None:
            self._first += value

    def fold(self) -> None:
        """Close a planning window."""
        if self._count:
            self._windows.append(self._sum / self._count)
            self._sum, self._count = 0.0, 0

    @property
    def typical(self) -> float:
        if self._windows:
            return statistics.median(self._windows)
        if self._count:
            return self._sum / self._count
        return self._first or 0.0


class QuantityCost:
    """The cost of one quantity per occurrence: training-thread seconds, device seconds, background CPU seconds."""

    def __init__(self) -> None:
        self.host = Samples()
        self.device = Samples()
        self.background = Samples()     # the background threads' CPU per occurrence, one sample per planning window
        self._background_seen = (0.0, 0)   # their total CPU on this quantity's messages, and occurrences, at the last

    @property
    def count(self) -> int:
        return self.host.seen

    @property
    def warming_up(self) -> bool:
        """Whether the cost rests on the first occurrence (on the training thread or in the background) alone."""
        return 0 < self.host.seen < 2 or 0 < self.background.seen < 2

    def fold(self, background_total: float) -> None:
        """Close a planning window. ``background_total``: the background threads' CPU on this quantity's messages so
        far. The window's share of it per occurrence is one background sample, like the host's: the first window's
        (files created, the first write's schemas: a ResNet-50's first per-filter step cost the recorder ~1.5 s) is
        set apart once there is a second, instead of staying in a run-long average. CPU charged after the window of
        its occurrences (the recorder writes every 0.5 s) goes to the next window that has occurrences."""
        total, count = self._background_seen
        if self.count > count:
            self.background.add((background_total - total) / (self.count - count))
            self._background_seen = (background_total, self.count)
        self.host.fold()
        self.device.fold()
        self.background.fold()

    @property
    def seconds(self) -> float:
        """Per occurrence: the larger of host and device time (they overlap), plus the background threads' share."""
        return max(self.host.typical, self.device.typical) + self.background.typical


class OverheadBudget:
    """Measures what telemetry costs on this run and plans its cadence to stay within ``fraction`` of training time.

    The callback reports each piece of work (``spent``) and each optimizer step's end (``step_ended``); ``plan``
    holds the cadence in force (``scalars_every``, ``filters_every``, ``snapshot_every``) and ``report`` what is
    published in the heartbeat.
    """

    def __init__(self, fraction: float | None, plan: dict[str, int], fixed: Iterable[str] = (),
                 refresh_seconds: float = 0.5, snapshot_seconds: float = 5.0, replan_seconds: float = 2.0) -> None:
        self.fraction = None if fraction is None else float(fraction)
        self.fixed = set(fixed)
        self.refresh_seconds = refresh_seconds
        self.snapshot_seconds = snapshot_seconds
        self.replan_seconds = replan_seconds
        self.plan = dict(plan)   # the cadence in force; the ``Schedule`` follows it
        self.planned = False     # the last ``step_ended`` measured the background and (with a budget) planned
        self.costs = {quantity: QuantityCost() for quantity in QUANTITIES}
        self.ledgers: list[Any] = []      # ``CpuLedger`` of each background thread
        self.device = DeviceTimer()
        self._step_walls: deque[float] = deque(maxlen=64)     # wall seconds of recent steps, minus the callback's
        self._spent_in_step = 0.0
        self._last_end: float | None = None
        self._last_plan: float | None = None   # when costs were last brought up to date (the first step's end)
        self._cost_fraction = 0.0

    # -- measuring ----------------------------------------------------------------------------------------------
    def spent(self, quantity: str, seconds: float, *, more: bool = False) -> None:
        """An occurrence of ``quantity`` took ``seconds`` on the training thread (``more``: this is more of the last
        occurrence's work, e.g. publishing what a measurement measured)."""
        cost = self.costs[quantity]
        if more:
            cost.host.add_to_last(seconds)
        else:
            cost.host.add(seconds)
        self._spent_in_step += seconds

    def step_ended(self, now: float) -> bool:
        """An optimizer step ended at ``now`` (perf_counter); whether the plan changed (``planned``: whether the
        costs were brought up to date, every ``replan_seconds``)."""
        self.planned = False
        if self._last_end is not None:
            self._step_walls.append(max(now - self._last_end - self._spent_in_step, 0.0))
        self._last_end = now
        self._spent_in_step = 0.0
        for quantity, seconds in self.device.collect():
            self.costs[quantity].device.add(seconds)
        if self._last_plan is None:
            self._last_plan = now
        if now - self._last_plan < self.replan_seconds or len(self._step_walls) < 4:
            return False
        self.planned = True
        if self.fraction is None:
            self._measure_background(now)
            return False
        return self._replan(now)

    # -- planning -----------------------------------------------------------------------------------------------
    @property
    def bare_step_seconds(self) -> float:
        return statistics.median(self._step_walls) if self._step_walls else 0.0

    def _measure_background(self, now: float) -> dict[str, float]:
        """Bring the costs up to date (the background threads' ledgers, the window averages) and the cost fraction
        of the plan in force; each quantity's cost per occurrence."""
        for quantity, cost in self.costs.items():
            cost.fold(sum(ledger.seconds(MESSAGE_TYPES[quantity]) for ledger in self.ledgers))
        self._last_plan = now
        cost = {quantity: self.costs[quantity].seconds for quantity in QUANTITIES}
        self._cost_fraction = self._fraction_of(cost)
        return cost

    def _fraction_of(self, cost: dict[str, float]) -> float:
        """What the plan in force costs, as a fraction of the bare step time."""
        step = self.bare_step_seconds
        if step <= 0:
            return 0.0
        return sum(cost[quantity] / self.plan[f"{quantity}_every"] for quantity in QUANTITIES
                   if self.costs[quantity].count and self.plan[f"{quantity}_every"] > 0) / step

    def _replan(self, now: float) -> bool:
        cost = self._measure_background(now)
        step = self.bare_step_seconds
        if step <= 0:
            return False
        wanted = self._cadence(step, cost)
        changed = False
        for key, value in wanted.items():
            if key in self.fixed or self._keeps(self.plan[key], value):
                continue
            self.plan[key] = nice_at_least(value)
            changed = True
        self._cost_fraction = self._fraction_of(cost)
        return changed

    def _cadence(self, step: float, cost: dict[str, float]) -> dict[str, float]:
        """The sparsest cadence each quantity needs to fit its share (continuous; rounded by the caller)."""
        budget = _PLANNED_SHARE * self.fraction * step
        scalars_every = self.plan["scalars_every"]   # never planned: every step's loss is kept; its cost comes first
        left = max(budget - (cost["scalars"] / scalars_every if scalars_every else 0.0), _LEFT_AFTER_SCALARS * budget)
        for_filters = _FILTERS_SHARE * left
        if "snapshot_every" in self.fixed:   # the user's snapshots cost what they cost; per-filter data takes the rest
            fixed_every = self.plan["snapshot_every"]
            snapshots = cost["snapshot"] / fixed_every if fixed_every and self.costs["snapshot"].count else 0.0
            for_filters = max(left - snapshots, (1 - _FILTERS_SHARE) * left)
        filters_every = max(cost["filters"] / for_filters, self.refresh_seconds / step, 1.0) \
            if self.costs["filters"].count else float(self.plan["filters_every"])
        if self.costs["filters"].warming_up:
            # a cost known from the first occurrence alone holds its one-time costs: measure again soon rather than
            # wait the thousands of steps that cost implies (a ResNet-50 on the CPU: ~2000) for a truer figure
            filters_every = min(filters_every, _WARMUP_REFRESHES * max(self.refresh_seconds / step, 1.0))
        rest = max(left - cost["filters"] / nice_at_least(filters_every), (1 - _FILTERS_SHARE) * left)
        snapshot_every = max(cost["snapshot"] / rest, self.snapshot_seconds / step, 1.0) \
            if self.costs["snapshot"].count else float(self.plan["snapshot_every"])
        return {"filters_every": filters_every, "snapshot_every": snapshot_every}

    @staticmethod
    def _keeps(current: int, wanted: float) -> bool:
        """Keep the cadence in force while it costs at most 25 % over its share and no denser readable cadence fits
        with 10 % to spare: costs measured on a busy machine wobble, and a cadence that flaps confuses the reader.
        (Between 50 and 100 steps: 50 is kept up to a wanted 62.5, 100 down to 45.5.)"""
        if wanted <= 1.0:
            return current == 1
        return wanted / 1.25 <= current <= nice_at_least(1.1 * wanted)

    def report(self) -> dict[str, Any]:
        """The heartbeat's ``schedule`` field (docs/protocol.md)."""
        step = self.bare_step_seconds
        return {"budget": self.fraction, "fixed": sorted(self.fixed), **self.plan,
                "cost": round(self._cost_fraction, 5),
                "step_seconds": round(step, 6),
                "seconds": {quantity: round(self.costs[quantity].seconds, 6) for quantity in QUANTITIES}}
