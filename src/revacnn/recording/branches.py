"""The branch tree of a recorded run, and which recorded rows belong to a branch. No torch.

A run that went back (``undo``, ``rewind``, the divergence guard's rewind) goes on as a new branch; the ack of that
command carries ``result.branch``: ``{branch, parent, from_step, at_step, restore_point, reason}`` (docs/protocol.md,
"Undo and rewind"). One branch trains at a time, so a row belongs to the branch that was live when it was published:
the latest branch whose ack came before it in the run's message order (``seq``; the trainer publishes the old
branch's steps before that ack). The *path* of a branch is the series that leads to it: its parent's rows up to the
step it left from, the grandparent's up to the step the parent left from, and so on, then its own rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROOT = {"branch": 0, "parent": None, "from_step": 0, "at_step": None, "restore_point": None, "reason": "start",
        "seq": -1}


def branch_tree(steering_log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every branch in the order it started, from the final acks of a run (``RunReader.steering_log``): the root
    (branch 0) and one per done ``undo``/``rewind``, each with the ``seq`` of its ack."""
    tree = [dict(ROOT)]
    for entry in steering_log:
        result = entry.get("result")
        if entry.get("status") != "done" or not isinstance(result, dict) or not isinstance(result.get("branch"), dict):
            continue
        tree.append({**result["branch"], "seq": entry.get("seq")})
    return tree


def live_branches(seqs: np.ndarray, tree: list[dict[str, Any]]) -> np.ndarray:
    """The branch live when each row (by its ``seq``) was published."""
    starts = np.array([b["seq"] if b["seq"] is not None else -1 for b in tree], np.int64)
    index = np.searchsorted(starts, np.asarray(seqs, np.int64), side="right") - 1
    ids = np.array([b["branch"] for b in tree], np.int64)
    return ids[np.clip(index, 0, len(tree) - 1)]


def branch_path(tree: list[dict[str, Any]], branch: int) -> list[tuple[int, int | None]]:
    """``[(branch, last step of it on the path or None), …]`` from ``branch`` up to the root."""
    by_id = {b["branch"]: b for b in tree}
    if branch not in by_id:
        raise KeyError(f"no branch {branch} in this recording (branches: {sorted(by_id)})")
    path, limit, current = [], None, by_id[branch]
    while True:
        path.append((current["branch"], limit))
        if current["parent"] is None or current["parent"] not in by_id:
            return path
        limit = current["from_step"] if limit is None else min(limit, current["from_step"])
        current = by_id[current["parent"]]


def rows_on_path(steps: np.ndarray, seqs: np.ndarray, tree: list[dict[str, Any]], branch: int) -> np.ndarray:
    """Which rows (``steps``, ``seqs`` in write order) make up the series leading to ``branch``'s last state."""
    live = live_branches(seqs, tree)
    keep = np.zeros(len(steps), bool)
    for member, limit in branch_path(tree, branch):
        rows = live == member
        if limit is not None:
            rows &= np.asarray(steps) <= limit
        keep |= rows
    return keep


def own_rows(seqs: np.ndarray, tree: list[dict[str, Any]], branch: int) -> np.ndarray:
    """The rows ``branch`` itself trained (not its ancestors')."""
    return live_branches(seqs, tree) == branch
