"""The network view's figure: a column per layer, a node per filter (a density strip and its strongest filters for a
layer too big for nodes; the strips are one heatmap, a single image) or per layer of a collapsed group, paths
between them, labels that never overlap (figures/network_labels.py).

Node colour is the mean |activation|; the nodes' jitter (their mean squared gradient) is applied in the browser
(assets/revacnn.js, ``jitter``), which finds the node trace by ``NODES_UID``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..viewmodels.network import DETAIL_COLUMNS, DETAIL_NODES, FULL_Y, full_x
from .network_labels import FONT, MIN_PLOT_PX, label_layout

NODES_UID = "revacnn-nodes"  # the network figure's node trace, found by the client-side jitter
STRIP_UID = "revacnn-strips"  # the big layers' density strips

NO_LAYER = ("this run monitors no layer: its module has no Conv2d or Linear layer (or none matched the callback's "
            "layers)")


ODD_COLOUR = "#c62828"
COLORBAR_PX = 60     # the colour bar and its title, right of the plot
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


def _strip_trace(strips: list[dict[str, Any]], cell_px: float, px_per_unit: float) -> go.Heatmap:
    """The big layers' density strips as one heatmap, which Plotly draws as a single image (a mark per cell, ~1,700
    at a ResNet-50's size, made every frame of the nodes' jitter and every update slow to draw): a column of cells
    ``cell_px`` wide per strip, transparent between strips, each cell coloured by its filters' mean |activation| on
    the nodes' colour axis, with its hover text and click data (the layer opened on the cell's filters: the node
    trace's custom data as JSON, which views/network.py's ``click_target`` reads)."""
    xs = sorted({c["x"] for c in strips})
    columns = [sorted((c for c in strips if c["x"] == x), key=lambda c: -c["y"]) for x in xs]
    # the rows: every strip's cell edges (cell r of n spans 1 - (r + 1) / n .. 1 - r / n); one grid when every
    # strip has the same number of cells, as the view model's strips do
    edges = sorted({round(1.0 - r / len(cells), 9) for cells in columns for r in range(len(cells) + 1)})
    half = min(0.35, cell_px / 2 / px_per_unit)
    colours = dict(zip((id(c) for c in strips), colour_values(np.array(
        [np.nan if c["strength"] is None else c["strength"] for c in strips], dtype=float))))
    # numpy arrays: Plotly validates them whole, not value by value (a third of the figure's build time); NaN is
    # sent as null, a gap
    shape = (len(edges) - 1, 2 * len(xs) - 1)
    z, text, custom = np.full(shape, np.nan), np.full(shape, "", dtype=object), np.full(shape, None, dtype=object)
    for ci, cells in enumerate(columns):
        for ri, (lo, hi) in enumerate(zip(edges, edges[1:])):
            c = cells[min(len(cells) - 1, int((1.0 - (lo + hi) / 2) * len(cells)))]
            z[ri, 2 * ci] = colours[id(c)]
            text[ri, 2 * ci] = (f"{c['label']}<br>mean act |a|: {c['strength']:.3g}<br>click to show these filters"
                                if c["strength"] is not None else f"{c['label']}<br>click to show these filters")
            # a string: dcc.Graph passes on a heatmap cell's click data only when it is not a list
            custom[ri, 2 * ci] = json.dumps([c["layer"], c["filters"][0], c["filters"][1] - c["filters"][0], "",
                                             "open"])
    return go.Heatmap(x=[v for x in xs for v in (x - half, x + half)], y=edges, z=z, text=text, customdata=custom,
                      hoverinfo="text", hoverongaps=False, coloraxis="coloraxis", ygap=1, showlegend=False,
                      uid=STRIP_UID)


def network_figure(model: dict[str, Any], uirevision: str = "network") -> tuple[go.Figure, int]:
    """The figure and the index of its node trace (the last: the jitter shakes it, clicks select its nodes).
    A zoomed model's figure shows the zoom's ranges (the view is drawn for them: a refresh keeps them, whatever
    Plotly keeps); ``uirevision``: Plotly keeps the user's other changes while it stays the same."""
    nodes, columns, paths = model["nodes"], model["columns"], model["paths"]
    strips = model.get("strips") or []
    detail = model.get("detail")
    fig = go.Figure(_path_traces(nodes, paths))
    labels = [col["label"] + (" ❄" if col.get("frozen") else (" (❄ part)" if col.get("partly_frozen") else ""))
              for col in columns]
    lay = label_layout(labels, [col["caption"] for col in columns])
    plot_px = 600 - lay["top"] - lay["bottom"]
    x_range = (detail or {}).get("x") or list(full_x(len(columns)))
    column_px = _plot_width(lay) / max(1e-9, abs(x_range[1] - x_range[0]))
    if strips:
        rows = max(sum(1 for c in strips if c["x"] == x) for x in {c["x"] for c in strips})
        fig.add_trace(_strip_trace(strips, max(3.0, min(12.0, plot_px / rows - 1)), column_px))
    odd = [i for i, n in enumerate(nodes) if not_finite_stats(n)]
    fig.add_trace(_node_trace(nodes, odd, plot_px))
    shapes, notes = _column_notes(columns, lay)
    if odd:
        notes.append({"x": 0.0, "y": 1.0, "yshift": lay["top"] - 14, "xref": "paper", "yref": "paper",
                      "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                      "text": f"⚠ {len(odd)} of {len(nodes)} nodes hold NaN or ±inf statistics (outlined red: "
                              f"diverged?); colours and paths use the finite values", "font": {"size": 11,
                                                                                               "color": ODD_COLOUR}})
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
                      xaxis={"visible": False, "range": x_range},
                      yaxis={"visible": False, "range": (detail or {}).get("y") or list(FULL_Y)},
                      plot_bgcolor="white",
                      coloraxis={"colorscale": "Viridis", "colorbar": {"title": {"text": "mean |act|", "side": "right"},
                                                                        "thickness": 10}},
                      uirevision=uirevision, hovermode="closest", hoverdistance=_hover_px(column_px))
    return fig, len(fig.data) - 1


def _node_trace(nodes: list[dict[str, Any]], odd: list[int], plot_px: float) -> go.Scatter:
    """The nodes: a marker per filter, range of filters or group, coloured by mean |activation|, outlined blue when
    frozen and red when a statistic is NaN or infinite (``odd``); the trace the jitter shakes (``NODES_UID``)."""
    strength = np.array([np.nan if n["strength"] is None else n["strength"] for n in nodes], dtype=float)
    custom = [[n.get("layer") or "", (n["filters"] or [0])[0], len(n["filters"]) if n["filters"] else 0,
               n.get("group") or "", n.get("action") or ""] for n in nodes]
    return go.Scatter(
        x=[n["x"] for n in nodes], y=[n["y"] for n in nodes], mode="markers", text=[_node_text(n) for n in nodes],
        hoverinfo="text", customdata=custom, showlegend=False, uid=NODES_UID,
        marker={"size": [_size(n, plot_px) for n in nodes], "color": colour_values(strength),
                "coloraxis": "coloraxis", "symbol": [_symbol(n) for n in nodes],
                "line": {"width": [3 if n["frozen"] or i in odd else 1 for i, n in enumerate(nodes)],
                         "color": [ODD_COLOUR if i in odd else ("#29b6f6" if n["frozen"] else "#333")
                                   for i, n in enumerate(nodes)]}})


def _hover_px(column_px: float) -> int:
    """How far from a node (past its marker) the pointer still picks it: Plotly's 20 px, less where columns are
    closer, so that a strip's cell under the pointer is not taken by the next column's node."""
    return int(max(4, min(20, column_px / 3)))


def _plot_width(lay: dict[str, Any]) -> float:
    """The plot's width in pixels: the figure's less its margins and colour bar, or, for a figure as wide as its
    container, the narrowest plot the page gives the view (a wider page draws the strips a little wider)."""
    return lay["width"] - 20 - COLORBAR_PX if lay["width"] else MIN_PLOT_PX


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
