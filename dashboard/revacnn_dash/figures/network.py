"""The network view's figure: a column per layer, a node per filter (a density strip and its strongest filters for a
layer too big for nodes) or per layer of a collapsed group, paths between them, labels that never overlap
(figures/network_labels.py).

Node colour is the mean |activation|; the nodes' jitter (their mean squared gradient) is applied in the browser
(assets/revacnn.js, ``jitter``), which finds the node trace by ``NODES_UID``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..viewmodels.network import DETAIL_COLUMNS, DETAIL_NODES, FULL_Y, full_x
from .network_labels import FONT, label_layout

NODES_UID = "revacnn-nodes"  # the network figure's node trace, found by the client-side jitter
STRIP_UID = "revacnn-strips"  # the big layers' density strips

NO_LAYER = ("this run monitors no layer: its module has no Conv2d or Linear layer (or none matched the callback's "
            "layers)")


ODD_COLOUR = "#c62828"
STAT_KEYS = ("strength", "jitter", "grad", "update", "norm")


def not_finite_stats(node: dict[str, Any]) -> bool:
    """Whether one of a node's statistics is NaN or infinite (None, no statistic, is not odd)."""
    return any(node.get(k) is not None and not np.isfinite(node[k]) for k in STAT_KEYS)


def colour_values(values: np.ndarray) -> list[float]:
    """Marker colours: the values, NaN drawn as the smallest finite one and ±inf as the extreme finite ones, so one
    diverged node neither breaks the colour scale nor the figure's JSON."""
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return [lo if np.isnan(x) else float(np.clip(x, lo, hi)) for x in v]


def _node_text(n: dict[str, Any]) -> str:
    """A node's hover text: its label and statistics."""
    parts = [n["label"]]
    for label, k in (("act |a|", "strength"), ("grad² (jitter)", "jitter"), ("|grad|", "grad"),
                     ("update ratio", "update"), ("‖w‖", "norm")):
        if n.get(k) is not None:
            parts.append(f"{label}: {n[k]:.3g}")
    if n["frozen"]:
        parts.append("❄ frozen")
    if n.get("group"):
        parts.append("click to expand")
    return "<br>".join(parts)


def _path_traces(nodes: list[dict[str, Any]], paths: list[tuple[int, int, float]]) -> list[go.Scatter]:
    """The paths in four traces by width bucket (a trace has one line width)."""
    buckets: list[list[tuple[int, int]]] = [[], [], [], []]
    for s, t, w in paths:
        b = min(3, max(0, int(w * 4))) if np.isfinite(w) else 0
        buckets[b].append((s, t))
    traces = []
    for b, pairs in enumerate(buckets):
        xs, ys = [], []
        for s, t in pairs:
            xs += [nodes[s]["x"], nodes[t]["x"], None]
            ys += [nodes[s]["y"], nodes[t]["y"], None]
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"width": 0.5 + 1.5 * b, "color": f"rgba(90,90,90,{0.15 + 0.15 * b})"}))
    return traces


def _strip_trace(strips: list[dict[str, Any]], rows_px: float) -> go.Scatter:
    """The big layers' density strips: one square per cell, coloured by its filters' mean |activation|, the cells
    of a column touching; a click opens the layer on the cell's filters."""
    strength = np.array([np.nan if c["strength"] is None else c["strength"] for c in strips], dtype=float)
    text = [f"{c['label']}<br>mean act |a|: {c['strength']:.3g}<br>click to show these filters"
            if c["strength"] is not None else f"{c['label']}<br>click to show these filters" for c in strips]
    custom = [[c["layer"], c["filters"][0], c["filters"][1] - c["filters"][0], "", "open"] for c in strips]
    return go.Scatter(
        x=[c["x"] for c in strips], y=[c["y"] for c in strips], mode="markers", text=text, hoverinfo="text",
        customdata=custom, showlegend=False, uid=STRIP_UID,
        marker={"symbol": "square", "size": max(3.0, min(12.0, rows_px)), "color": colour_values(strength),
                "coloraxis": "coloraxis", "line": {"width": 0}})


def network_figure(model: dict[str, Any], uirevision: str = "network") -> tuple[go.Figure, int]:
    """The figure and the index of its node trace (the last: the jitter shakes it, clicks select its nodes).
    A zoomed model's figure shows the zoom's ranges (the view is drawn for them: a refresh keeps them, whatever
    Plotly keeps); ``uirevision``: Plotly keeps the user's other changes while it stays the same."""
    nodes, columns, paths = model["nodes"], model["columns"], model["paths"]
    strips = model.get("strips") or []
    fig = go.Figure(_path_traces(nodes, paths))
    strength = np.array([np.nan if n["strength"] is None else n["strength"] for n in nodes], dtype=float)
    odd = [i for i, n in enumerate(nodes) if not_finite_stats(n)]
    text = [_node_text(n) for n in nodes]
    custom = [[n.get("layer") or "", (n["filters"] or [0])[0], len(n["filters"]) if n["filters"] else 0,
               n.get("group") or "", n.get("action") or ""] for n in nodes]
    labels = [col["label"] + (" ❄" if col.get("frozen") else (" (❄ part)" if col.get("partly_frozen") else ""))
              for col in columns]
    lay = label_layout(labels, [col["caption"] for col in columns])
    plot_px = 600 - lay["top"] - lay["bottom"]
    sizes = [_size(n, plot_px) for n in nodes]
    rows = max([sum(1 for c in strips if c["x"] == col["x"]) for col in columns] + [1])
    if strips:
        fig.add_trace(_strip_trace(strips, (600 - lay["top"] - lay["bottom"]) / rows - 1))
    fig.add_trace(go.Scatter(
        x=[n["x"] for n in nodes], y=[n["y"] for n in nodes], mode="markers", text=text, hoverinfo="text",
        customdata=custom, showlegend=False, uid=NODES_UID,
        marker={"size": sizes, "color": colour_values(strength), "coloraxis": "coloraxis",
                "symbol": [_symbol(n) for n in nodes],
                "line": {"width": [3 if n["frozen"] or i in odd else 1 for i, n in enumerate(nodes)],
                         "color": [ODD_COLOUR if i in odd else ("#29b6f6" if n["frozen"] else "#333")
                                   for i, n in enumerate(nodes)]}}))
    shapes, notes = _column_notes(columns, lay)
    if odd:
        notes.append({"x": 0.0, "y": 1.0, "yshift": lay["top"] - 14, "xref": "paper", "yref": "paper",
                      "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                      "text": f"⚠ {len(odd)} of {len(nodes)} nodes hold NaN or ±inf statistics (outlined red: "
                              f"diverged?); colours and paths use the finite values", "font": {"size": 11,
                                                                                               "color": ODD_COLOUR}})
    detail = model.get("detail")
    if detail:
        notes.append({"x": 0.0, "y": 1.0, "yshift": lay["top"] + (16 if odd else 0), "xref": "paper",
                      "yref": "paper", "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                      "text": detail_note(model["detail"]), "font": {"size": 11, "color": "#555"}})
    if not columns:
        notes.append({"x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "text": NO_LAYER, "showarrow": False,
                      "font": {"size": 13, "color": "#555"}})
    fig.update_layout(shapes=shapes, annotations=notes,
                      margin={"l": 10, "r": 10, "b": lay["bottom"],
                              "t": lay["top"] + (16 if odd else 0) + (16 if model.get("detail") else 0)},
                      width=lay["width"], height=600 if lay["width"] else None,
                      xaxis={"visible": False, "range": (detail or {}).get("x") or list(full_x(len(columns)))},
                      yaxis={"visible": False, "range": (detail or {}).get("y") or list(FULL_Y)},
                      plot_bgcolor="white",
                      coloraxis={"colorscale": "Viridis", "colorbar": {"title": {"text": "mean |act|", "side": "right"},
                                                                        "thickness": 10}},
                      uirevision=uirevision, hovermode="closest")
    return fig, len(fig.data) - 1


def detail_note(detail: dict[str, Any]) -> str:
    """The zoomed view's note: what it draws filter by filter, what it leaves out, how to get back."""
    if not detail["layers"]:
        return (f"{detail['columns_in_view']} columns in view: zoom in to {DETAIL_COLUMNS} or fewer to draw each "
                f"filter of their strips · double-click: the whole network")
    hidden = (f", {detail['hidden']:,} more in view hidden (every k-th drawn, at most {DETAIL_NODES:,}): zoom in "
              f"further for them" if detail["hidden"] else "")
    return (f"zoomed: {detail['drawn']:,} filters of {len(detail['layers'])} strip(s) drawn one by one{hidden} · "
            f"double-click: the whole network")


def _size(n: dict[str, Any], plot_px: float) -> float:
    """A node's marker size: a group 16, a range of filters 14, a filter 11, or, in a zoomed view's strip, what
    the distance to the next drawn filter holds (3 to 11 px)."""
    if n.get("group"):
        return 16
    if n.get("spacing"):
        return float(max(3.0, min(11.0, n["spacing"] * plot_px - 1)))
    return 11 if n["filters"] and len(n["filters"]) == 1 else 14


def _symbol(n: dict[str, Any]) -> str:
    if n.get("action"):
        return "triangle-up"
    return "square" if n.get("group") else ("x" if n["frozen"] else "circle")


def _column_notes(columns: list[dict[str, Any]], lay: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The columns' labels above (full names on hover), their captions below and the frozen columns' bands."""
    shapes, notes = [], []
    angle = -90 if lay["upright"] else 0
    for col, label, caption in zip(columns, lay["text"], lay["captions"]):
        notes.append({"x": col["x"], "y": 1.0, "xref": "x", "yref": "paper", "yanchor": "bottom", "text": label,
                      "hovertext": col["label"], "showarrow": False, "textangle": angle, "yshift": 2,
                      "font": {"size": FONT, "color": "#0277bd" if col.get("frozen") else "#222"}})
        notes.append({"x": col["x"], "y": 0.0, "xref": "x", "yref": "paper", "yanchor": "top", "text": caption,
                      "showarrow": False, "textangle": angle, "yshift": -2,
                      "font": {"size": FONT, "color": "#777"}})
        if col.get("frozen"):
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": col["x"] - 0.3, "x1": col["x"] + 0.3,
                           "y0": 0, "y1": 1, "fillcolor": "rgba(41,182,246,0.15)", "line": {"width": 0},
                           "layer": "below"})
    return shapes, notes
