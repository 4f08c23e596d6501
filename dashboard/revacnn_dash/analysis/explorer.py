"""Training-log explorer computations (DeepTracker): hierarchy, per-node bands over the run, filter × iteration
charts with similarity ordering, and horizon-chart folding. Torch-free; reads only through ``RunReader``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..compute.layers import TreeNode, layer_tree

__all__ = ["build_tree", "node_layers", "bucket_quantiles", "layer_overview", "filter_chart", "order_filters",
           "horizon_bands", "derived_cosine", "CHART_FIELDS", "steering_events"]

# fields of the filter × iteration chart: recorded ones and three derived from them
CHART_FIELDS = ("cosine", "update_ratio", "grad_weight_ratio", "grad_sq_mean", "grad_abs_mean", "weight_norm",
                "act_abs_mean")


# -- hierarchy ---------------------------------------------------------------------------------------------------
def build_tree(layer_names: list[str], root: str = "model") -> dict[str, Any]:
    """Nested index from dotted module names (model → stage → block → layer). Returns
    ``{"root": id, "nodes": {id: {"id", "name", "parent", "children": [ids], "layer": name | None, "depth"}}}``.
    A node id is the dotted prefix (the root is ``root``). Prefixes with a single child that is not a layer are
    collapsed into that child (``net`` in ``net.layer1.0.conv1`` is not a level of its own)."""
    monitored = set(layer_names)
    nodes: dict[str, dict[str, Any]] = {}

    def add(node: TreeNode, parent: str | None) -> None:
        node_id = node.id if node.path else root
        nodes[node_id] = {"id": node_id, "name": node.path[-1] if node.path else root, "parent": parent,
                          "children": [child.id for child in node.children.values()],
                          "layer": node.id if node.path and node.id in monitored else None, "depth": 0}
        for child in node.children.values():
            add(child, node_id)

    add(layer_tree(layer_names, strip_common=False), None)
    first_seen = {root: 0}                 # the index lists nodes in the order their names first appear
    for name in layer_names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            first_seen.setdefault(".".join(parts[:k]), len(first_seen))
    nodes = {node_id: nodes[node_id] for node_id in sorted(nodes, key=first_seen.__getitem__)}
    # collapse pass-through prefixes
    changed = True
    while changed:
        changed = False
        for node_id, node in list(nodes.items()):
            if node_id == root or node["layer"] is not None or len(node["children"]) != 1:
                continue
            child = nodes[node["children"][0]]
            parent = nodes[node["parent"]]
            parent["children"][parent["children"].index(node_id)] = child["id"]
            child["parent"] = parent["id"]
            child["name"] = node["name"] + "." + child["name"]
            del nodes[node_id]
            changed = True
    # a root with one child that is not a layer: skip it too
    while len(nodes[root]["children"]) == 1 and nodes[nodes[root]["children"][0]]["layer"] is None:
        only = nodes.pop(nodes[root]["children"][0])
        nodes[root]["children"] = only["children"]
        for c in only["children"]:
            nodes[c]["parent"] = root

    def depth(node_id, d):
        nodes[node_id]["depth"] = d
        for c in nodes[node_id]["children"]:
            depth(c, d + 1)
    depth(root, 0)
    return {"root": root, "nodes": nodes}


def node_layers(tree: dict, node_id: str) -> list[str]:
    """The monitored layers under a node, in order."""
    node = tree["nodes"][node_id]
    out = [node["layer"]] if node["layer"] else []
    for child in node["children"]:
        out += node_layers(tree, child)
    return out


# -- bands -------------------------------------------------------------------------------------------------------
def _row_quantiles(x: np.ndarray, qs=(0.0, 0.25, 0.5, 0.75, 1.0)) -> np.ndarray:
    """Quantiles of each row of ``x`` ignoring NaN (linear interpolation, as numpy's default) → [len(qs), rows]."""
    s = np.sort(x, axis=1)                     # NaNs sort last
    n = np.sum(~np.isnan(x), axis=1)
    out = np.full((len(qs), x.shape[0]), np.nan, np.float64)
    ok = n > 0
    if not ok.any():
        return out
    rows = np.nonzero(ok)[0]
    for j, q in enumerate(qs):
        pos = q * (n[ok] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n[ok] - 1)
        frac = pos - lo
        vlo = s[rows, lo].astype(np.float64)
        vhi = s[rows, hi].astype(np.float64)
        out[j, rows] = vlo + (vhi - vlo) * frac
    return out


def bucket_quantiles(steps: np.ndarray, values: np.ndarray, buckets: int) -> dict[str, np.ndarray]:
    """Split rows (steps) into at most ``buckets`` consecutive groups of equal row count; per group pool every
    value of the group's rows (all columns) and return min, q1, median, q3, max and mean, with each group's first
    and last step. values: [T] or [T, M]."""
    values = np.asarray(values, np.float64)
    if values.ndim == 1:
        values = values[:, None]
    t = len(steps)
    if t == 0:
        empty = np.zeros(0)
        return {"step": np.zeros(0, np.int64), "step_end": np.zeros(0, np.int64), "min": empty, "q1": empty,
                "median": empty, "q3": empty, "max": empty, "mean": empty}
    size = max(1, math.ceil(t / max(1, buckets)))
    groups = math.ceil(t / size)
    pad = groups * size - t
    padded = np.concatenate([values, np.full((pad, values.shape[1]), np.nan)]) if pad else values
    pooled = padded.reshape(groups, size * values.shape[1])
    q = _row_quantiles(pooled)
    with np.errstate(invalid="ignore"):
        counts = np.sum(~np.isnan(pooled), axis=1)
        mean = np.where(counts > 0, np.nansum(pooled, axis=1) / np.maximum(counts, 1), np.nan)
    starts = np.asarray(steps)[::size]
    ends = np.asarray(steps)[np.minimum(np.arange(groups) * size + size - 1, t - 1)]
    return {"step": starts, "step_end": ends, "min": q[0], "q1": q[1], "median": q[2], "q3": q[3], "max": q[4],
            "mean": mean}


def layer_overview(run, tree: dict | None = None, start: int | None = None, stop: int | None = None,
                   resolution: int = 400, field: str = "grad_weight_ratio") -> dict[str, Any]:
    """Small-multiple data for every node of the hierarchy over ``start <= step < stop``.

    ``field="grad_weight_ratio"`` reads the per-layer ‖g‖/‖w‖ stream (one table for all layers, every per-filter
    step). Any per-filter field (``update_ratio``, ``grad_sq_mean`` …) is read per layer from the filter pyramids at
    ``resolution`` rows and averaged over the layer's filters. Per node, the values of all its layers at the steps of
    a bucket are pooled: ``{"nodes": {id: bucket_quantiles(...)}, "tree", "field", "raw": bool}``;
    ``raw`` is True when every bucket is a single recorded step of a single row (the zoomed-in case)."""
    if tree is None:
        tree = build_tree(run.layer_names())
    names = [n for n in node_layers(tree, tree["root"])]
    if field in ("grad_weight_ratio", "layers"):
        series = run.layer_series("grad_weight_ratio", start, stop)
        steps, columns = series["step"], {name: i for i, name in enumerate(series["layers"])}
        values = series["values"]
        per_layer = {name: values[:, columns[name]] for name in names if name in columns}
        common_steps = steps
    else:
        per_layer, common_steps = {}, None
        for name in names:
            s = run.filter_series(name, field, start, stop, resolution=resolution)
            if not len(s["step"]):
                continue
            with _quiet():
                per_layer[name] = (s["step"], np.nanmean(s["values"], axis=1))
            if common_steps is None or len(s["step"]) > len(common_steps):
                common_steps = s["step"]
        if common_steps is None:
            common_steps = np.zeros(0, np.int64)
        aligned = {}
        for name, (s_steps, v) in per_layer.items():     # layers share per-filter steps; align any that do not
            same = len(s_steps) == len(common_steps) and np.array_equal(s_steps, common_steps)
            aligned[name] = v if same else np.interp(common_steps, s_steps, v, left=np.nan, right=np.nan)
        per_layer, steps = aligned, common_steps
    steps = np.asarray(common_steps)
    out = {}
    for node_id in tree["nodes"]:
        members = [per_layer[n] for n in node_layers(tree, node_id) if n in per_layer]
        if not members:
            continue
        out[node_id] = bucket_quantiles(steps, np.stack(members, axis=1), resolution)
    raw = len(steps) <= resolution
    return {"nodes": out, "tree": tree, "field": field, "raw": raw, "steps": int(len(steps))}


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


# -- horizon chart -----------------------------------------------------------------------------------------------
def horizon_bands(values: np.ndarray, bands: int = 3, baseline: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Fold a series into a horizon chart: deviation from ``baseline`` (default the median) cut into ``bands``
    equal slices of the largest |deviation|; returns (positive [bands, T], negative [bands, T], band height), each
    slice clipped to [0, height] so the slices can be drawn on top of each other in darker shades."""
    v = np.asarray(values, np.float64)
    finite = np.isfinite(v)   # a diverged run's NaN and ±inf: gaps, neither the baseline nor the scale
    base = float(np.median(v[finite])) if baseline is None and finite.any() else (baseline or 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        dev = np.where(finite, v - base, np.nan)
    dev = np.where(np.isfinite(dev), dev, np.nan)
    top = float(np.nanmax(np.abs(dev))) if np.isfinite(dev).any() else 0.0
    height = top / bands if top > 0 else 1.0
    pos = np.stack([np.clip(np.nan_to_num(dev) - k * height, 0, height) for k in range(bands)])
    neg = np.stack([np.clip(-np.nan_to_num(dev) - k * height, 0, height) for k in range(bands)])
    return pos, neg, height


# -- filter × iteration chart ------------------------------------------------------------------------------------
def derived_cosine(norms: np.ndarray, ratios: np.ndarray, previous_norms: np.ndarray | None = None) -> np.ndarray:
    """cosine(w_t, w_prev) per filter from the recorded per-filter fields of consecutive level-0 rows:
    ‖Δw‖ = update_ratio·‖w_prev‖ and ‖Δw‖² = ‖w_t‖² + ‖w_prev‖² − 2 w_t·w_prev give
    cos = (‖w_t‖² + ‖w_prev‖² − ‖Δw‖²) / (2 ‖w_t‖ ‖w_prev‖). ``norms``, ``ratios``: [T, F]; ``previous_norms``:
    [F] norms of the row before the first (else the first row uses the small-angle form 1 − r²/2)."""
    n = np.asarray(norms, np.float64)
    r = np.asarray(ratios, np.float64)
    prev = np.empty_like(n)
    prev[1:] = n[:-1]
    prev[0] = np.nan if previous_norms is None else previous_norms
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (n * n + prev * prev - (r * prev) ** 2) / (2 * n * prev)
    first = np.isnan(cos[0]) & np.isfinite(r[0])
    cos[0, first] = 1 - r[0, first] ** 2 / 2
    gap = np.isnan(prev) & np.isfinite(r)          # a filter that is new at this row: no previous weights
    gap[0] = False
    cos[gap] = np.nan
    return np.clip(cos, -1.0, 1.0).astype(np.float32)


def _coefficients(run, layer: str) -> int:
    """Coefficients per filter of a layer (from the latest structure's weight shape)."""
    for _, body in reversed(run.structures()):
        for item in body.get("layers", []):
            if item["name"] == layer and item.get("weight_shape"):
                return int(np.prod(item["weight_shape"][1:]))
    return 1


def filter_chart(run, layer: str, field: str = "cosine", start: int | None = None, stop: int | None = None,
                 resolution: int | None = 600, order: str = "pca") -> dict[str, Any]:
    """Filter × iteration matrix of one layer: ``{"step": [T], "step_end": [T], "filter_ids": [F], "values":
    [F, T] (rows in display order), "order": [F] column indices, "field", "exact": bool, "raw": bool}``.

    Fields: any recorded per-filter field; ``grad_weight_ratio`` = ‖g‖/‖w‖ per filter = √(grad_sq_mean·n)/‖w‖;
    ``cosine`` = cosine(w_t, w_prev) between consecutive per-filter records, exact on raw rows (see
    ``derived_cosine``); on pyramid buckets it is approximated by 1 − max(update_ratio)²/2 — the bucket's largest
    change — and ``exact`` is False."""
    def get(name):
        return run.filter_series(layer, name, start, stop, resolution=resolution)

    if field == "cosine":
        norms, ratios = get("weight_norm"), get("update_ratio")
        raw = "min" not in ratios
        if raw:
            values = derived_cosine(norms["values"], ratios["values"])
        else:
            values = np.clip(1 - ratios["max"].astype(np.float64) ** 2 / 2, -1, 1).astype(np.float32)
        base = ratios
    elif field == "grad_weight_ratio":
        sq, norms = get("grad_sq_mean"), get("weight_norm")
        n = _coefficients(run, layer)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = (np.sqrt(sq["values"].astype(np.float64) * n) / norms["values"]).astype(np.float32)
        base, raw = sq, "min" not in sq
    else:
        base = get(field)
        values, raw = base["values"], "min" not in base
    values = np.asarray(values, np.float32).T              # [F, T]
    order_index = order_filters(values, order)
    step = base["step"]
    return {"step": step, "step_end": base.get("step_end", step), "filter_ids": base["filter_ids"][order_index],
            "values": values[order_index], "order": order_index, "field": field, "exact": raw or field != "cosine",
            "raw": raw}


def order_filters(matrix: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Row order that puts similar rows (filters' series) next to each other.

    ``pca``: classical (Torgerson) 1-D MDS — for Euclidean distances its 1-D embedding is the projection on the
    first principal component, computed by power iteration on XᵀX (fast: 2,048 × 1,000 in tens of ms). ``spectral``: the
    Fiedler-vector ordering of scikit-learn's SpectralEmbedding on an RBF affinity (slower, better for clusters).
    ``none``: recorded order. NaN cells (filters that did not exist) are filled with the column mean first."""
    f = matrix.shape[0]
    if method == "none" or f < 3 or matrix.shape[1] < 2:
        return np.arange(f)
    x = np.asarray(matrix, np.float64)
    col_mean = np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=0) if np.isfinite(x).any() else 0
    x = np.where(np.isfinite(x), x, np.nan_to_num(col_mean))
    x = x - x.mean(axis=0, keepdims=True)
    if not np.any(x):
        return np.arange(f)
    if method == "spectral":
        from sklearn.manifold import SpectralEmbedding

        emb = SpectralEmbedding(n_components=1, affinity="rbf", random_state=seed).fit_transform(x)[:, 0]
    else:
        emb = _first_component(x, seed)
    return np.argsort(emb, kind="stable")


def _first_component(x: np.ndarray, seed: int = 0, iterations: int = 30, tol: float = 1e-5) -> np.ndarray:
    """Scores of the rows of centred ``x`` on its first principal component (power iteration, at most
    ``iterations``: an ordering needs the direction only roughly; sign fixed so the scores sum to ≥ 0)."""
    x = x.astype(np.float64, copy=False)
    v = np.random.default_rng(seed).normal(size=x.shape[1])
    v /= np.linalg.norm(v)
    for _ in range(iterations):
        w = x.T @ (x @ v)
        norm = np.linalg.norm(w)
        if norm == 0:
            break
        w /= norm
        done = np.linalg.norm(w - v) < tol
        v = w
        if done:
            break
    scores = x @ v
    return -scores if scores.sum() < 0 else scores


def steering_events(run) -> list[dict[str, Any]]:
    """Done steering commands with the step they took effect at: ``[{"step", "op", "label"}]``."""
    out = []
    for entry in run.steering_log():
        if entry.get("status") == "done" and entry.get("step") is not None:
            args = (entry.get("result") or {}).get("changes") or {}
            label = entry.get("op", "")
            if args.get("layer"):
                label += f" {args['layer']}"
            if out and out[-1]["step"] == int(entry["step"]):       # one mark per step: "widen + remove_filters"
                out[-1]["label"] += " + " + label
                out[-1]["op"] += "+" + (entry.get("op") or "")
            else:
                out.append({"step": int(entry["step"]), "op": entry.get("op") or "", "label": label})
    return out
