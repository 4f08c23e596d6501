"""Validation image × iteration analysis (DeepTracker): correctness, per-class error heatlines, the anomaly rule,
top-changed filters per iteration and the cube. Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["correctness", "class_error", "stable_flips", "flag_classes", "anomalies", "top_changed", "cube_cells", "cube",
           "interval_change", "shared_with_flagged", "overlap_with"]


def correctness(val: dict) -> tuple[np.ndarray, np.ndarray]:
    """From ``RunReader.val_predictions()``: (correct [T, N] bool, valid [T, N] bool — False where a row was
    shorter and padded with -1)."""
    pred, label = np.asarray(val["pred"]), np.asarray(val["label"])
    valid = pred >= 0
    if pred.size == 0:
        return np.zeros(pred.shape, bool), valid
    return (pred == label[None, : pred.shape[1]]) & valid, valid


def class_error(correct: np.ndarray, labels: np.ndarray, classes: int | None = None,
                valid: np.ndarray | None = None) -> np.ndarray:
    """Per class and iteration, the error rate over that class's images: [C, T]."""
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1 if classes is None and labels.size else (classes or 0)
    valid = np.ones_like(correct) if valid is None else valid
    out = np.full((classes, correct.shape[0]), np.nan)
    for c in range(classes):
        cols = labels == c
        n = valid[:, cols].sum(1)
        wrong = (~correct[:, cols] & valid[:, cols]).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[c] = np.where(n > 0, wrong / np.maximum(n, 1), np.nan)
    return out


def _run_length_before(x: np.ndarray) -> np.ndarray:
    """For [T, N]: at row t, how many rows immediately before t (t−1, t−2, …) hold the same value as row t−1."""
    t = x.shape[0]
    run = np.zeros(x.shape, np.int64)
    if t < 2:
        return run
    same = np.zeros(x.shape[1], np.int64)
    run[1] = 1
    same[:] = 1
    for i in range(2, t):
        same = np.where(x[i - 1] == x[i - 2], same + 1, 1)
        run[i] = same
    return run


def stable_flips(correct: np.ndarray, window: int, direction: str = "backward") -> np.ndarray:
    """DeepTracker's anomaly rule per image and iteration → [T, N] bool.

    ``backward``: at sample t the image's correctness differs from each of the previous ``window`` samples
    (it was stable for ``window`` samples, then flipped at t). ``forward``: it differs from each of the next
    ``window`` samples (a flip right after t that then stays). ``both``: either."""
    c = np.asarray(correct, bool)
    t = c.shape[0]
    out = np.zeros(c.shape, bool)
    if direction in ("backward", "both") and t > window:
        run = _run_length_before(c)
        changed = np.zeros(c.shape, bool)
        changed[1:] = c[1:] != c[:-1]
        out |= changed & (run >= window)
    if direction in ("forward", "both") and t > window:
        rev = c[::-1]
        run = _run_length_before(rev)
        changed = np.zeros(c.shape, bool)
        changed[1:] = rev[1:] != rev[:-1]
        out |= (changed & (run >= window))[::-1]
    return out


def flag_classes(flips: np.ndarray, labels: np.ndarray, threshold: int, classes: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per class and iteration: (count of anomalous images [C, T], flagged = count >= threshold [C, T])."""
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1 if classes is None and labels.size else (classes or 0)
    counts = np.stack([flips[:, labels == c].sum(1) for c in range(classes)]) if classes else \
        np.zeros((0, flips.shape[0]), np.int64)
    return counts, counts >= threshold


def anomalies(val: dict, window: int = 3, threshold: int = 5, direction: str = "backward") -> dict[str, Any]:
    """Everything the validation panel needs: correctness, per-class error, flips, counts, flagged (class, step)."""
    correct, valid = correctness(val)
    labels = np.asarray(val["label"])[: correct.shape[1]]
    classes = int(labels.max()) + 1 if labels.size else 0
    flips = stable_flips(correct, window, direction) & valid
    counts, flagged = flag_classes(flips, labels, threshold, classes)
    steps = np.asarray(val["steps"])
    pairs = [(int(c), int(steps[t])) for c, t in zip(*np.nonzero(flagged))]
    pairs.sort(key=lambda p: (p[1], p[0]))
    return {"steps": steps, "correct": correct, "valid": valid, "labels": labels, "classes": classes,
            "error": class_error(correct, labels, classes, valid), "flips": flips, "counts": counts,
            "flagged": flagged, "flagged_pairs": pairs, "window": window, "threshold": threshold}


def interval_change(run, layer: str, start: int | None, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Per filter of ``layer``: Σ (1 − cosine(w_t, w_prev)) over the per-filter records with start < t <= stop —
    how much the filter turned between two validation samples. Returns (filter ids, change)."""
    from .explorer import derived_cosine

    lo = None if start is None else int(start) + 1
    norms = run.filter_series(layer, "weight_norm", lo, int(stop) + 1)
    ratios = run.filter_series(layer, "update_ratio", lo, int(stop) + 1)
    if not len(norms["step"]):
        return norms["filter_ids"], np.zeros(len(norms["filter_ids"]))
    if "min" in ratios:          # only buckets left for this interval: small-angle form of the largest change
        cos = 1 - ratios["max"].astype(np.float64) ** 2 / 2
    else:
        cos = derived_cosine(norms["values"], ratios["values"]).astype(np.float64)
    return norms["filter_ids"], np.nansum(1 - cos, axis=0)


def top_changed(run, layers: list[str], start: int | None, stop: int, k: int = 10) -> dict[str, list[int]]:
    """Per layer, the ids of the ``k`` filters that turned most (largest Σ(1 − cos)) in (start, stop]."""
    out = {}
    for layer in layers:
        ids, change = interval_change(run, layer, start, stop)
        if len(ids):
            order = np.argsort(-change, kind="stable")[: min(k, len(ids))]
            out[layer] = [int(ids[i]) for i in order if change[i] > 0]
    return out


def cube_cells(run, layers: list[str], val_steps, k: int = 10, max_steps: int = 30) -> dict[str, Any]:
    """The cube's layers × iterations cells: per layer and validation interval (t′, t], the top-``k`` changed filters
    of that layer. Only the latest ``max_steps`` validation steps are kept (each interval is one read per layer).
    Independent of the anomaly rule's settings, so the page caches it apart from them."""
    all_steps = [int(s) for s in np.asarray(val_steps).tolist()]
    first = max(0, len(all_steps) - max_steps)
    steps = all_steps[first:]
    top = {step: top_changed(run, layers, all_steps[first + i - 1] if first + i > 0 else None, step, k)
           for i, step in enumerate(steps)}
    cells = [[sorted(top[step].get(layer, [])) for step in steps] for layer in layers]
    return {"layers": layers, "steps": steps, "cells": cells, "k": k, "top": top}


def cube(run, layers: list[str], info: dict, k: int = 10, max_steps: int = 30,
         cells: dict | None = None) -> dict[str, Any]:
    """DeepTracker's cube over iterations: layers × validation intervals × classes. Each (layer, interval) cell
    holds the top-``k`` changed filters of that layer over the interval ending at a validation step (filter changes
    do not depend on the class; ``cube_cells``, or ``cells`` when already computed); the class axis is which classes
    the anomaly rule flags at that step (``flagged`` [C, T]). ``shared_with_flagged`` turns one class slice into a
    layers × iterations matrix."""
    cells = cells or cube_cells(run, layers, info["steps"], k, max_steps)
    first = len(info["steps"]) - len(cells["steps"])
    return {**cells, "flagged": np.asarray(info["flagged"], bool)[:, first:]}


def shared_with_flagged(cube_data: dict, klass: int | None = None) -> np.ndarray:
    """One class slice of the cube as [L, T]: per cell, how many of its filters are also among the top changed of
    the same layer at a *different* step where ``klass`` (any class when None) is flagged — filters that keep
    turning whenever that class flips (DeepTracker's highlighted shared kernels)."""
    flagged = cube_data["flagged"]
    at = flagged.any(0) if klass is None else (flagged[klass] if klass < len(flagged) else
                                              np.zeros(len(cube_data["steps"]), bool))
    cells = cube_data["cells"]
    out = np.zeros((len(cells), len(cube_data["steps"])), np.int64)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            others = set().union(*(row[j] for j in np.nonzero(at)[0] if j != c))
            out[r, c] = len(set(cell) & others)
    return out


def overlap_with(cube_data: dict, row: int, col: int) -> np.ndarray:
    """|cell ∩ selected cell| for every cell of the selected cell's layer (other layers: 0) — the pinned view."""
    cells = cube_data["cells"]
    chosen = set(cells[row][col])
    out = np.zeros((len(cells), len(cells[0]) if cells else 0), np.int64)
    for c, cell in enumerate(cells[row]):
        out[row, c] = len(chosen & set(cell))
    return out
