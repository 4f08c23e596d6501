"""ReVACNN §4.1 made measurable: filter diversity (clustering tendency of filter coefficients) and how much each
conv1 filter concentrates on one input colour channel, tracked over a run's snapshots. Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["hopkins", "mean_nn_cosine", "channel_concentration", "track_observations"]


def _unit_rows(w: np.ndarray) -> np.ndarray:
    x = np.asarray(w, np.float64).reshape(len(w), -1)
    x = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1)


def hopkins(w: np.ndarray, samples: int | None = None, seed: int = 0, dims: int = 10) -> float:
    """Hopkins statistic of filters' coefficient vectors (rows of ``w``, each centred and scaled to unit norm, then
    reduced to at most ``dims`` principal components so the statistic is not swamped by dimension):
    H = Σu / (Σu + Σw), u = distance from uniform random points in the data's bounding box to the nearest filter,
    w = distance from sampled filters to their nearest other filter. ≈ 0.5 for uniformly spread filters, → 1 for
    clustered ones. Averaged over 20 draws (seeded)."""
    x = _unit_rows(w)
    n = len(x)
    if n < 4:
        return float("nan")
    x = x - x.mean(0)
    u_, s, vt = np.linalg.svd(x, full_matrices=False)
    x = u_[:, :dims] * s[:dims]
    m = samples or max(2, n // 4)
    rng = np.random.default_rng(seed)
    lo, hi = x.min(0), x.max(0)
    values = []
    d_all = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(d_all, np.inf)
    for _ in range(20):
        pick = rng.choice(n, m, replace=False)
        w_dist = d_all[pick].min(1)
        pts = rng.uniform(lo, hi, size=(m, x.shape[1]))
        u_dist = np.linalg.norm(pts[:, None] - x[None], axis=2).min(1)
        values.append(u_dist.sum() / (u_dist.sum() + w_dist.sum()))
    return float(np.mean(values))


def mean_nn_cosine(w: np.ndarray) -> float:
    """Mean over filters of the cosine to the most similar other filter (coefficients centred per filter).
    High = redundant filters (clusters); low = diverse filters."""
    x = _unit_rows(w)
    if len(x) < 2:
        return float("nan")
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return float(sim.max(1).mean())


def channel_concentration(w: np.ndarray) -> np.ndarray:
    """Per filter of a first conv layer [out, C, kh, kw]: the largest share of the filter's energy Σw² held by one
    input channel, rescaled so 0 = energy spread evenly over the C channels and 1 = all in one channel:
    (max_c e_c / Σ e_c − 1/C) / (1 − 1/C)."""
    w = np.asarray(w, np.float64)
    e = (w.reshape(w.shape[0], w.shape[1], -1) ** 2).sum(2)
    c = w.shape[1]
    share = e.max(1) / np.maximum(e.sum(1), 1e-30)
    return (share - 1 / c) / (1 - 1 / c) if c > 1 else np.zeros(len(w))


def track_observations(run, layers: list[str] | None = None, first: str | None = None) -> dict[str, Any]:
    """Per snapshot: Hopkins and mean-NN cosine per conv layer, conv1 channel concentration (mean and share of
    filters above 0.5), and the validation accuracy nearest before each snapshot."""
    steps = run.snapshot_steps()
    out: dict[str, Any] = {"step": steps, "hopkins": {}, "nn_cosine": {}, "concentration_mean": [],
                           "concentration_high": [], "val_acc": []}
    val = run.val_predictions()
    acc = val["metrics"].get("val_acc")
    for step in steps:
        snap = run.snapshot(step)
        names = layers or [n for n in snap["body"].get("layer_names", []) if snap["arrays"][f"weight/{n}"].ndim == 4]
        for name in names:
            w = snap["arrays"][f"weight/{name}"]
            out["hopkins"].setdefault(name, []).append(hopkins(w))
            out["nn_cosine"].setdefault(name, []).append(mean_nn_cosine(w))
        conv1 = first or (names[0] if names else None)
        if conv1 is not None:
            conc = channel_concentration(snap["arrays"][f"weight/{conv1}"])
            out["concentration_mean"].append(float(conc.mean()))
            out["concentration_high"].append(float((conc > 0.5).mean()))
        before = np.nonzero(np.asarray(val["steps"]) <= step)[0] if acc is not None else []
        out["val_acc"].append(float(acc[before[-1]]) if len(before) else float("nan"))
    return out
