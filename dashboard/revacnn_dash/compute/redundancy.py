"""Redundancy hints for one layer: near-duplicate, dead and converged filters."""

from __future__ import annotations

import numpy as np


def redundancy(weight: np.ndarray | None, fields: dict[str, np.ndarray] | None, frozen: np.ndarray | None = None,
               dup_cosine: float = 0.95, dead_fraction: float = 0.01, converged_fraction: float = 0.02
               ) -> dict[str, list]:
    """Near-duplicate pairs (cosine of flattened filters ≥ ``dup_cosine``), dead filters (act_abs_mean below
    ``dead_fraction`` × the layer median, or exactly 0) and converged ones (update_ratio below
    ``converged_fraction`` × the layer median; frozen filters excluded)."""
    hints: dict[str, list] = {"duplicates": [], "dead": [], "converged": []}
    if weight is not None and len(weight) > 1:
        hints["duplicates"] = _near_duplicates(weight, dup_cosine)
    if fields:
        act = fields.get("act_abs_mean")
        if act is not None and len(act):
            # a diverged run's NaN or inf statistics are no hint: the median and the comparisons skip them
            act = np.asarray(act, dtype=np.float64)
            fin = act[np.isfinite(act)]
            with np.errstate(over="ignore"):   # the median of two 1e308s overflows: inf, harmless here
                med = float(np.median(fin)) if fin.size else 0.0
            hints["dead"] = [int(i) for i in np.flatnonzero(np.isfinite(act) & ((act <= dead_fraction * med)
                                                                               | (act == 0)))]
        upd = fields.get("update_ratio")
        if upd is not None and len(upd):
            upd = np.asarray(upd, dtype=np.float64)
            live = upd if frozen is None else upd[~frozen[: len(upd)]]
            live = live[np.isfinite(live)]
            with np.errstate(all="ignore"):
                med = float(np.median(live)) if len(live) else 0.0
                cand = (np.flatnonzero(np.isfinite(upd) & (upd < converged_fraction * med)) if med > 0
                        else np.zeros(0, int))
            if frozen is not None:
                cand = [i for i in cand if not frozen[i]]
            hints["converged"] = [int(i) for i in cand]
    return hints


def _near_duplicates(weight: np.ndarray, dup_cosine: float) -> list[tuple[int, int, float]]:
    """Pairs of filters whose flattened weights have a cosine ≥ ``dup_cosine``, most similar first."""
    w = np.asarray(weight, float).reshape(len(weight), -1)
    if not w.shape[1]:
        return []
    # a filter holding NaN or inf is nobody's duplicate; each row is scaled by its largest |value| first, so that
    # 1e38s do not overflow the norm
    ok = np.isfinite(w).all(axis=1)
    w = np.where(ok[:, None], w, 0.0)
    scale = np.abs(w).max(axis=1)
    w = w / np.where(scale > 0, scale, 1)[:, None]
    norms = np.linalg.norm(w, axis=1)
    unit = w / np.where(norms == 0, 1, norms)[:, None]
    cos = np.where(np.outer(ok, ok), unit @ unit.T, 0.0)
    i, j = np.triu_indices(len(w), 1)
    mask = cos[i, j] >= dup_cosine
    pairs = sorted(zip(i[mask].tolist(), j[mask].tolist(), cos[i, j][mask].tolist()), key=lambda t: -t[2])
    return [(a, b, round(c, 4)) for a, b, c in pairs]
