"""The network view's model: one column per visible layer or collapsed group, one node per filter (or layer of a
group) with its statistics, the paths drawn between consecutive columns, and how much each node shakes.

Level of detail: a layer with more filters than ``max_nodes`` cannot be read as a column of nodes (a ResNet-50's
layers hold 64 to 2,048 filters each), so its column is a density strip (``strip_rows`` cells, each the
mean activation of a contiguous range of filters) beside its ``top_k`` strongest filters as nodes. Clicking a cell
opens the layer on that range (``opened``): its filters as nodes, with a node to go back to the strip."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from ..compute.layers import visible_columns

#: the most filter nodes a column shows: at ~11 px a node, what a column of the view's ~350-500 px holds apart
NODES_PER_COLUMN = 32

# a group node's statistics: the mean over its layers of each layer's mean
GROUP_FIELDS = ("grad_sq_mean", "act_abs_mean", "grad_abs_mean", "update_ratio")


def top_half(strength: np.ndarray) -> np.ndarray:
    """Indices of the strongest ceil(n/2) entries, ranked numerically (ties by index), in ascending index order.
    (The original ranked the numbers as strings; we do not.) NaNs rank last."""
    s = np.asarray(strength, dtype=float)
    n = len(s)
    if n == 0:
        return np.zeros(0, dtype=int)
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((np.arange(n), -key))
    return np.sort(order[: math.ceil(n / 2)])


def _bins(n: int, max_nodes: int) -> list[tuple[int, int]]:
    if n <= max_nodes:
        return [(i, i + 1) for i in range(n)]
    edges = np.linspace(0, n, max_nodes + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _frozen_mask(layer: dict[str, Any]) -> np.ndarray:
    out = int(layer.get("out", 0))
    frozen = layer.get("frozen")
    mask = np.zeros(out, dtype=bool)
    if frozen == "all":
        mask[:] = True
    elif isinstance(frozen, list):
        for i in frozen:
            if 0 <= int(i) < out:
                mask[int(i)] = True
    return mask


def network_model(structure: dict[str, Any], fields: dict[str, dict[str, np.ndarray]], expanded: Iterable[str],
                  max_nodes: int = NODES_PER_COLUMN, max_lines: int = 3000, opened: dict[str, list[int]] | None = None,
                  top_k: int = 3, strip_rows: int = 32) -> dict[str, Any]:
    """Positions, sizes and stats of every visible node, the density strips of the layers too big for nodes, and
    the paths to draw between consecutive columns.

    ``fields`` = ``{layer: {field: array[out]}}`` (``RunState.filters_by_layer``); ``opened`` = ``{layer: [first,
    end)}``, the filter range a big layer is opened on. Returns plain lists: ``nodes`` (x, y, jitter, strength,
    frozen, layer, filters, label, action), ``strips`` (x, y, strength, layer, filters, label: one per cell),
    ``columns`` and ``paths`` (src node index, dst node index, width 0–1)."""
    layers = {l["name"]: l for l in structure.get("layers", [])}
    names = [l["name"] for l in structure.get("layers", [])]
    columns = visible_columns(names, expanded)
    nodes: list[dict[str, Any]] = []
    strips: list[dict[str, Any]] = []
    col_nodes: list[list[int]] = []
    opened = opened or {}
    for ci, col in enumerate(columns):
        if col["kind"] == "layer":
            name = col["layers"][0]
            members, cells = _layer_column(col, layers[name], fields, max_nodes, opened.get(name), top_k, strip_rows)
        else:
            members, cells = _group_column(col, layers, fields, max_nodes), []
        n = len(members)
        ids = []
        for i, m in enumerate(members):
            m["x"] = float(ci)
            m.setdefault("y", 1.0 - (i + 0.5) / n if n else 0.5)
            m["column"] = ci
            if not m.get("action"):    # the node going back to the strip carries no path
                ids.append(len(nodes))
            nodes.append(m)
        for c in cells:
            c["x"] = float(ci)
        strips.extend(cells)
        col["x"] = float(ci)
        col_nodes.append(ids)
    paths = _paths(structure, columns, nodes, col_nodes, max_lines)
    return {"columns": columns, "nodes": nodes, "strips": strips, "paths": paths}


def _filter_node(name: str, f: dict[str, np.ndarray], frozen: np.ndarray, a: int, b: int, label: str
                 ) -> dict[str, Any]:
    """A node for filters ``a``..``b - 1`` of layer ``name``: their mean statistics."""
    return {"layer": name, "filters": list(range(a, b)), "label": label,
            "jitter": _mean(f.get("grad_sq_mean"), a, b), "strength": _mean(f.get("act_abs_mean"), a, b),
            "grad": _mean(f.get("grad_abs_mean"), a, b), "update": _mean(f.get("update_ratio"), a, b),
            "norm": _mean(f.get("weight_norm"), a, b), "frozen": bool(frozen[a:b].all()) if b > a else False}


def _layer_column(col: dict[str, Any], layer: dict[str, Any], fields: dict[str, dict[str, np.ndarray]],
                  max_nodes: int, opened: list[int] | None, top_k: int, strip_rows: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A layer's column: a node per filter of its shown range (all of it, or the range it is opened on), or, past
    ``max_nodes``, a density strip of the range and its ``top_k`` strongest filters as nodes. Sets the column's
    caption and frozen flags. Returns (nodes, strip cells)."""
    name = layer["name"]
    out = int(layer["out"])
    f = fields.get(name, {})
    frozen = _frozen_mask(layer)
    col["frozen"] = layer.get("frozen") == "all"
    col["partly_frozen"] = bool(frozen.any())
    first, end = _opened_range(opened, out)
    members: list[dict[str, Any]] = []
    if first > 0 or end < out:
        members.append({"layer": name, "filters": None, "action": "close", "y": 1.015, "frozen": False,
                        "label": f"▲ back to all {out} filters of {name}", "jitter": None, "strength": None,
                        "grad": None, "update": None, "norm": None})
    if end - first <= max_nodes:
        n = end - first
        top = 0.97 if members else 1.0      # below the node going back
        for j, i in enumerate(range(first, end)):
            node = _filter_node(name, f, frozen, i, i + 1, f"{name}[{i}]")
            node["y"] = top * (1.0 - (j + 0.5) / n)
            members.append(node)
        col["caption"] = f"{out}" if n == out else f"{first}–{end - 1} of {out}"
        return members, []
    cells = []
    rows = _bins(end - first, strip_rows)
    for r, (a, b) in enumerate(rows):
        a, b = a + first, b + first
        cells.append({"layer": name, "filters": [a, b], "y": 1.0 - (r + 0.5) / len(rows),
                      "strength": _mean(f.get("act_abs_mean"), a, b),
                      "label": f"{name}[{a}–{b - 1}]: {b - a} filters"})
    strength = f.get("act_abs_mean")
    if strength is not None and len(strength) >= end:
        for i in top_filters(np.asarray(strength[first:end], dtype=float), top_k):
            fi = int(i) + first
            node = _filter_node(name, f, frozen, fi, fi + 1, f"{name}[{fi}]: top {top_k} by mean |act|")
            node["y"] = cells[_row_of(rows, int(i))]["y"]
            members.append(node)
    col["caption"] = f"{out}" if end - first == out else f"{first}–{end - 1} of {out}"
    col["strip"] = True
    return members, cells


def _opened_range(opened: list[int] | None, out: int) -> tuple[int, int]:
    """The filter range ``[first, end)`` a layer is opened on, clipped to its ``out`` filters (a layer narrowed
    since it was opened); the whole layer when it is not opened or the range is empty."""
    if not opened or len(opened) != 2:
        return 0, out
    first, end = max(0, int(opened[0])), min(out, int(opened[1]))
    return (first, end) if end > first else (0, out)


def _row_of(rows: list[tuple[int, int]], i: int) -> int:
    """The strip row holding the ``i``-th filter of the range."""
    for r, (a, b) in enumerate(rows):
        if a <= i < b:
            return r
    return len(rows) - 1


def top_filters(strength: np.ndarray, k: int) -> list[int]:
    """The ``k`` strongest filters (finite values only, ties by index), in ascending index order."""
    s = np.asarray(strength, dtype=float)
    finite = np.flatnonzero(np.isfinite(s))
    if not finite.size or k <= 0:
        return []
    order = finite[np.lexsort((finite, -s[finite]))]
    return sorted(int(i) for i in order[:k])


def _group_column(col: dict[str, Any], layers: dict[str, dict[str, Any]], fields: dict[str, dict[str, np.ndarray]],
                  max_nodes: int) -> list[dict[str, Any]]:
    """A collapsed group's column: a node per layer inside, or per bin of layers past ``max_nodes``."""
    lnames = col["layers"]
    members = []
    for a, b in _bins(len(lnames), max_nodes):
        group = lnames[a:b]
        stats: dict[str, list[float]] = {k: [] for k in GROUP_FIELDS}
        for n in group:
            for k in stats:
                if k in fields.get(n, {}):
                    stats[k].append(_mean(fields[n][k], 0, len(fields[n][k])))
        members.append({
            "layer": group[0] if len(group) == 1 else None, "group": col["id"], "layers": group,
            "filters": None, "label": group[0] if len(group) == 1 else f"{group[0]} … {group[-1]}",
            "jitter": _avg(stats["grad_sq_mean"]), "strength": _avg(stats["act_abs_mean"]),
            "grad": _avg(stats["grad_abs_mean"]), "update": _avg(stats["update_ratio"]),
            "norm": None, "frozen": all(layers[n].get("frozen") == "all" for n in group),
            "out": sum(int(layers[n]["out"]) for n in group)})
    col["frozen"] = all(layers[n].get("frozen") == "all" for n in lnames)
    col["partly_frozen"] = any(layers[n].get("frozen") for n in lnames)
    col["caption"] = f"{len(lnames)} layers"
    return members


def _paths(structure: dict[str, Any], columns: list[dict[str, Any]], nodes: list[dict[str, Any]],
           col_nodes: list[list[int]], max_lines: int) -> list[tuple[int, int, float]]:
    """Paths between consecutive connected columns, from the stronger half of the source column's nodes; thickness
    from the source's activation strength, at most ``max_lines`` in all."""
    col_of = {}
    for ci, col in enumerate(columns):
        for n in col["layers"]:
            col_of[n] = ci
    linked = set()
    for a, b in structure.get("layer_edges", []):
        if a in col_of and b in col_of and col_of[b] == col_of[a] + 1:
            linked.add(col_of[a])
    if not structure.get("layer_edges"):
        linked = set(range(len(columns) - 1))
    paths: list[tuple[int, int, float]] = []
    per_pair = max(1, max_lines // max(1, len(linked)))
    for ci in sorted(linked):
        src, dst = col_nodes[ci], col_nodes[ci + 1]
        if not src or not dst:   # a layer with no filter (or a group of such layers): nothing to link
            continue
        strength = np.array([nodes[i]["strength"] if nodes[i]["strength"] is not None else np.nan for i in src],
                            dtype=float)
        if np.all(np.isnan(strength)):
            continue
        chosen = [src[i] for i in top_half(strength)]
        widths = path_widths(strength)
        budget = max(1, per_pair // max(1, len(chosen)))
        targets = dst if len(dst) <= budget else [dst[int(j)] for j in np.linspace(0, len(dst) - 1, budget)]
        for s in chosen:
            w = widths[src.index(s)]
            for t in targets:
                paths.append((s, t, w))
    return paths


def path_widths(strength: np.ndarray) -> list[float]:
    """Each source node's path width, 0–1: its strength over the column's largest finite one. A diverged run's
    NaN draws the thinnest path, +inf the thickest (above every finite one), and the widths are always finite."""
    s = np.asarray(strength, dtype=float)
    finite = s[np.isfinite(s)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    with np.errstate(all="ignore"):
        w = s / top if top > 0 else np.zeros_like(s)
    w = np.where(np.isposinf(s), 1.0, np.where(np.isfinite(w), w, 0.0))
    return [float(v) for v in np.clip(w, 0.0, 1.0)]


def _mean(arr: np.ndarray | None, a: int, b: int) -> float | None:
    """The mean of ``arr[a:b]`` in float64 (float32 1e38s overflowed), NaN when a value is NaN or the values hold
    both infinities, None when there is no value."""
    if arr is None or b > len(arr) or b <= a:
        return None
    return finite_safe_mean(np.asarray(arr[a:b], dtype=np.float64))


def finite_safe_mean(values: np.ndarray) -> float:
    """``np.mean`` without its RuntimeWarnings: NaN for a NaN (or +inf with -inf), ±inf for an infinity."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if not v.size or np.isnan(v).any():
        return float("nan")
    pos, neg = bool(np.isposinf(v).any()), bool(np.isneginf(v).any())
    if pos or neg:
        return float("nan") if pos and neg else (float("inf") if pos else float("-inf"))
    return float(np.mean(v / 2) * 2) if np.abs(v).max() > 1e300 else float(np.mean(v))


def _avg(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return finite_safe_mean(np.array(values)) if values else None


def jitter_pixels(jitter: list[float | None], max_px: float = 8.0, reference_quantile: float = 0.9) -> list[float]:
    """Shake amplitude in pixels, proportional to the mean squared gradient. The scale is set so that the node at the
    ``reference_quantile`` of the visible ones shakes ``max_px``; larger ones are clipped there (squared gradients
    are heavy-tailed: scaling by the maximum would leave all but one or two nodes still)."""
    arr = np.array([np.nan if v is None else v for v in jitter], dtype=float)
    finite = arr[np.isfinite(arr)]
    if not len(finite):
        return [0.0] * len(jitter)
    ref = float(np.quantile(finite, reference_quantile, method="lower"))
    if not ref > 0:
        ref = float(finite.max())
    if not ref > 0:
        return [0.0] * len(jitter)
    with np.errstate(all="ignore"):   # 1e308 / a small reference overflows to inf: clipped to max_px
        return [0.0 if not np.isfinite(v) else float(max(0.0, min(max_px, max_px * v / ref))) for v in arr]
