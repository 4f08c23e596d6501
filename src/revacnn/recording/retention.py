"""Which snapshots a recording keeps, and in which order it drops them when its disk budget runs out. No torch.

The default keeps every snapshot while the budget allows, and when it does not, drops first those outside the
*retained* set — the ``RECENT`` most recent snapshots and, among the older ones, the oldest of each power-of-two
band of age (age = newest step − step: [1, 2), [2, 4), [4, 8), … steps), so that about log2(run length / spacing)
older snapshots remain, spread evenly on a log scale of age. A user policy (``snapshot_keep``) is an int (keep the n
most recent) or a callable given the snapshot steps on disk (ascending) that returns the steps to keep; either is
applied after every snapshot written, and under budget pressure its retained set plays the part of the default's.
Policy and order: docs/design.md, "Recording: disk budget".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Union

RECENT = 3

SnapshotKeep = Union[None, int, Callable[[list[int]], Iterable[int]]]


def check_policy(keep: SnapshotKeep) -> SnapshotKeep:
    """``keep`` if it is a valid ``snapshot_keep``; ValueError otherwise."""
    if keep is None or callable(keep):
        return keep
    if isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1:
        return keep
    raise ValueError(f"snapshot_keep must be None, an int ≥ 1 or a callable(steps) -> steps to keep, got {keep!r}")


def log_spaced(steps: list[int], recent: int = RECENT) -> set[int]:
    """The ``recent`` newest steps and the oldest step of each power-of-two band of age among the older ones."""
    ordered = sorted(set(steps))
    if not ordered:
        return set()
    keep = set(ordered[-recent:]) if recent > 0 else set()
    newest = ordered[-1]
    bands: dict[int, int] = {}
    for step in ordered[:-recent] if recent > 0 else ordered:
        band = max(newest - step, 1).bit_length()
        bands.setdefault(band, step)              # ascending steps: the first seen in a band is its oldest
    return keep | set(bands.values())


def retained(steps: list[int], keep: SnapshotKeep) -> set[int]:
    """The steps the policy keeps."""
    if keep is None:
        return log_spaced(steps)
    if isinstance(keep, int):
        return set(sorted(set(steps))[-keep:])
    return {int(step) for step in keep(sorted(set(steps)))}


def drop_order(steps: list[int], kept: set[int]) -> list[int]:
    """The order in which snapshots go under budget pressure, never including the newest: those outside ``kept``,
    oldest first; then the kept ones, oldest first except the run's first snapshot (the reference for "how far from
    the start"), which goes last."""
    ordered = sorted(set(steps))
    if len(ordered) < 2:
        return []
    older = ordered[:-1]
    spare = [step for step in older if step not in kept]
    held = [step for step in older[1:] if step in kept] + ([older[0]] if older[0] in kept else [])
    return spare + held
