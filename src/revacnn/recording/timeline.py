"""Which recorded rows a reader returns: the latest timeline (a resumed run replaces what it re-does) and a step
range. No torch."""

from __future__ import annotations

import numpy as np


def latest_timeline(steps: np.ndarray) -> np.ndarray:
    """Which rows, given in the order they were written, no later row supersedes. A run resumed from a checkpoint
    into the same recording starts again at an earlier step, and what it writes replaces every row written before
    from that step on (the branch the checkpoint abandoned), as TensorBoard purges on a restart; so does a new run
    recorded into a directory named for an older one. One run's rows, whose steps only grow, all pass."""
    keep = np.ones(len(steps), bool)
    if len(steps) > 1:
        later_min = np.minimum.accumulate(steps[::-1])[::-1]
        keep[:-1] = steps[:-1] < later_min[1:]
    return keep


def in_step_range(steps: np.ndarray, start: int | None, stop: int | None, ends: np.ndarray | None = None
                  ) -> np.ndarray:
    """Rows that overlap ``start <= step < stop``: a row spans ``steps`` to ``ends`` (a bucket), or one step."""
    ends = steps if ends is None else ends
    mask = np.ones(len(steps), bool)
    if start is not None:
        mask &= ends >= start
    if stop is not None:
        mask &= steps < stop
    return mask
