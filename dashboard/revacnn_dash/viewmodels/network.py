"""The network view's model: one column per visible layer or collapsed group, one node per filter (or layer of a
group) with its statistics, the paths drawn between consecutive columns, and how much each node shakes.

Level of detail: a layer with more filters than ``max_nodes`` cannot be read as a column of nodes (a ResNet-50's
layers hold 64 to 2,048 filters each), so its column is a density strip (``strip_rows`` cells, each the
mean activation of a contiguous range of filters) beside its ``top_k`` strongest filters as nodes. Clicking a cell
opens the layer on that range (``opened``): its filters as nodes, with a node to go back to the strip. Zooming in
(``zoom``: the x and y ranges the user's view shows) to at most ``DETAIL_COLUMNS`` columns draws the strips in view
filter by filter, the filters in the visible y range only, at most ``DETAIL_NODES`` in all (past that every k-th,
the number hidden said in ``detail["hidden"]``); zooming back out returns to the strips."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from ..compute.layers import visible_columns

#: the most filter nodes a column shows: at ~11 px a node, what a column of the view's ~350-500 px holds apart
NODES_PER_COLUMN = 32

#: the most columns a zoomed view may show for its strips to be drawn filter by filter
DETAIL_COLUMNS = 8
#: the most filter nodes a zoomed view draws in its strips' place (every k-th past it): a figure that builds and
#: draws within the refresh (a 2,048-filter layer is drawn every 2nd filter until the view holds half of it)
DETAIL_NODES = 1024
#: the network figure's full axis ranges in data units (figures/network.py sets them: a column per unit of x)
FULL_Y = (-0.02, 1.03)

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


def full_x(columns: int) -> tuple[float, float]:
    """The network figure's full x range for ``columns`` columns (column ``i`` at x = ``i``)."""
    return -0.6, max(0.6, columns - 0.4)


def zoomed_layers(columns: list[dict[str, Any]], layers: dict[str, dict[str, Any]], zoom: dict[str, Any] | None,
                  max_nodes: int, opened: dict[str, list[int]]) -> dict[str, Any] | None:
    """What a zoomed view draws filter by filter: ``{"layers": [names of the strips in view], "x": [x0, x1],
    "y": [y0, y1] (the view's ranges), "columns_in_view": n}``, or None when the view shows the whole figure (no
    zoom, or zoomed back out).
    ``layers`` is empty when more than ``DETAIL_COLUMNS`` columns are in view."""
    if not zoom:
        return None
    fx = full_x(len(columns))
    x0, x1 = sorted(float(v) for v in (zoom.get("x") or fx))
    y0, y1 = sorted(float(v) for v in (zoom.get("y") or FULL_Y))
    if x1 - x0 >= 0.98 * (fx[1] - fx[0]) and y1 - y0 >= 0.98 * (FULL_Y[1] - FULL_Y[0]):
        return None
    in_view = [c for ci, c in enumerate(columns) if ci + 0.3 >= x0 and ci - 0.3 <= x1]
    strips = [c["layers"][0] for c in in_view if c["kind"] == "layer"
              and _span(_opened_range(opened.get(c["layers"][0]), int(layers[c["layers"][0]]["out"]))) > max_nodes]
    return {"layers": strips if len(in_view) <= DETAIL_COLUMNS else [], "x": [x0, x1], "y": [y0, y1],
            "columns_in_view": len(in_view)}


def network_model(structure: dict[str, Any], fields: dict[str, dict[str, np.ndarray]], expanded: Iterable[str],
                  max_nodes: int = NODES_PER_COLUMN, max_lines: int = 3000, opened: dict[str, list[int]] | None = None,
                  top_k: int = 3, strip_rows: int = 32, zoom: dict[str, Any] | None = None,
                  detail_nodes: int = DETAIL_NODES) -> dict[str, Any]:
    """Positions, sizes and stats of every visible node, the density strips of the layers too big for nodes, and
    the paths to draw between consecutive columns.

    ``fields`` = ``{layer: {field: array[out]}}`` (``RunState.filters_by_layer``); ``opened`` = ``{layer: [first,
    end)}``, the filter range a big layer is opened on. Returns plain lists: ``nodes`` (x, y, jitter, strength,
    frozen, layer, filters, label, action), ``strips`` (x, y, strength, layer, filters, label: one per cell),
    ``columns``, ``paths`` (src node index, dst node index, width 0–1) and ``detail``: None, or what the zoomed
    view (``zoom`` = ``{"x": [x0, x1], "y": [y0, y1]}``, either may be absent) draws filter by filter (``layers``,
    ``columns_in_view``, ``drawn`` and ``hidden``: the filters in view drawn and left out past ``detail_nodes``)."""
    layers = {l["name"]: l for l in structure.get("layers", [])}
    names = [l["name"] for l in structure.get("layers", [])]
    columns = visible_columns(names, expanded)
    opened = opened or {}
    detail = zoomed_layers(columns, layers, zoom, max_nodes, opened)
    windows = _detail_windows(detail, layers, opened, detail_nodes) if detail else {}
    nodes: list[dict[str, Any]] = []
    strips: list[dict[str, Any]] = []
    col_nodes: list[list[int]] = []
    for ci, col in enumerate(columns):
        if col["kind"] == "layer":
            name = col["layers"][0]
            members, cells = _layer_column(col, layers[name], fields, max_nodes, opened.get(name), top_k, strip_rows,
                                           windows.get(name))
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
    if detail:
        detail["drawn"] = sum(len(w["filters"]) for w in windows.values())
        detail["hidden"] = sum(w["in_view"] - len(w["filters"]) for w in windows.values())
    return {"columns": columns, "nodes": nodes, "strips": strips, "paths": paths, "detail": detail}


def _detail_windows(detail: dict[str, Any], layers: dict[str, dict[str, Any]], opened: dict[str, list[int]],
                    budget: int) -> dict[str, dict[str, Any]]:
    """Per strip in a zoomed view: the filters drawn (those of its shown range whose node would sit in the visible
    y range, every k-th when the view holds more than the layer's share of ``budget``), how many are in view, and
    the y distance between two drawn nodes as a fraction of the visible height (their marker size)."""
    y0, y1 = detail["y"]
    share = max(1, budget // max(1, len(detail["layers"])))
    windows = {}
    for name in detail["layers"]:
        first, end = _opened_range(opened.get(name), int(layers[name]["out"]))
        n = end - first
        lo = max(0, math.ceil(n * (1 - y1) - 0.5))      # row j sits at y = 1 - (j + 0.5) / n
        hi = min(n - 1, math.floor(n * (1 - y0) - 0.5))
        count = max(0, hi - lo + 1)
        stride = max(1, math.ceil(count / share))
        windows[name] = {"filters": [first + j for j in range(lo, hi + 1, stride)], "in_view": count, "n": n,
                         "first": first, "spacing": stride / (n * max(1e-9, y1 - y0))}
    return windows


def _filter_node(name: str, f: dict[str, np.ndarray], frozen: np.ndarray, a: int, b: int, label: str
                 ) -> dict[str, Any]:
    """A node for filters ``a``..``b - 1`` of layer ``name``: their mean statistics."""
    return {"layer": name, "filters": list(range(a, b)), "label": label,
            "jitter": _mean(f.get("grad_sq_mean"), a, b), "strength": _mean(f.get("act_abs_mean"), a, b),
            "grad": _mean(f.get("grad_abs_mean"), a, b), "update": _mean(f.get("update_ratio"), a, b),
            "norm": _mean(f.get("weight_norm"), a, b), "frozen": bool(frozen[a:b].all()) if b > a else False}


def _layer_column(col: dict[str, Any], layer: dict[str, Any], fields: dict[str, dict[str, np.ndarray]],
                  max_nodes: int, opened: list[int] | None, top_k: int, strip_rows: int,
                  window: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A layer's column: a node per filter of its shown range (all of it, or the range it is opened on), or, past
    ``max_nodes``, a density strip of the range and its ``top_k`` strongest filters as nodes, or, in a zoomed view
    (``window``: ``_detail_windows``), a node per filter in view, each where its strip row is. Sets the column's
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
    if window is not None:
        for fi in window["filters"]:
            node = _filter_node(name, f, frozen, fi, fi + 1, f"{name}[{fi}]")
            node["y"] = 1.0 - (fi - first + 0.5) / window["n"]
            node["spacing"] = window["spacing"]
            members.append(node)
        col["caption"] = f"{len(window['filters'])} of {out}"
        return members, []
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


def _span(bounds: tuple[int, int]) -> int:
    return bounds[1] - bounds[0]


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
