"""The network view's figure: a column per layer, a node per filter or group of filters, paths between them.

Node colour is the mean |activation|; the nodes' jitter (their mean squared gradient) is applied in the browser
(assets/revacnn.js, ``jitter``), which finds the node trace by ``NODES_UID``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

NODES_UID = "revacnn-nodes"  # the network figure's node trace, found by the client-side jitter

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


def network_figure(model: dict[str, Any]) -> tuple[go.Figure, int]:
    nodes, columns, paths = model["nodes"], model["columns"], model["paths"]
    fig = go.Figure()
    buckets = [[], [], [], []]
    for s, t, w in paths:
        b = min(3, max(0, int(w * 4))) if np.isfinite(w) else 0
        buckets[b].append((s, t))
    for b, pairs in enumerate(buckets):
        xs, ys = [], []
        for s, t in pairs:
            xs += [nodes[s]["x"], nodes[t]["x"], None]
            ys += [nodes[s]["y"], nodes[t]["y"], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"width": 0.5 + 1.5 * b, "color": f"rgba(90,90,90,{0.15 + 0.15 * b})"}))
    strength = np.array([np.nan if n["strength"] is None else n["strength"] for n in nodes], dtype=float)
    odd = [i for i, n in enumerate(nodes) if not_finite_stats(n)]
    colours = colour_values(strength)
    text = []
    for n in nodes:
        parts = [n["label"]]
        for label, k in (("act |a|", "strength"), ("grad² (jitter)", "jitter"), ("|grad|", "grad"),
                         ("update ratio", "update"), ("‖w‖", "norm")):
            if n.get(k) is not None:
                parts.append(f"{label}: {n[k]:.3g}")
        if n["frozen"]:
            parts.append("❄ frozen")
        if n.get("group"):
            parts.append("click to expand")
        text.append("<br>".join(parts))
    custom = [[n.get("layer") or "", (n["filters"] or [0])[0], len(n["filters"]) if n["filters"] else 0,
               n.get("group") or ""] for n in nodes]
    sizes = [16 if n.get("group") else (11 if n["filters"] and len(n["filters"]) == 1 else 14) for n in nodes]
    fig.add_trace(go.Scatter(
        x=[n["x"] for n in nodes], y=[n["y"] for n in nodes], mode="markers", text=text, hoverinfo="text",
        customdata=custom, showlegend=False, uid=NODES_UID,
        marker={"size": sizes, "color": colours, "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": {"text": "mean |act|"}, "thickness": 10},
                "symbol": ["square" if n.get("group") else ("x" if n["frozen"] else "circle") for n in nodes],
                "line": {"width": [3 if n["frozen"] or i in odd else 1 for i, n in enumerate(nodes)],
                         "color": [ODD_COLOUR if i in odd else ("#29b6f6" if n["frozen"] else "#333")
                                   for i, n in enumerate(nodes)]}}))
    shapes, notes = [], []
    crowded = len(columns) > 8
    for ci, col in enumerate(columns):
        label = col["label"] + (" ❄" if col.get("frozen") else (" (❄ part)" if col.get("partly_frozen") else ""))
        # many columns: stagger the labels on two rows so they do not overlap
        notes.append({"x": col["x"], "y": 1.06 if crowded and ci % 2 else 1.02, "xref": "x", "yref": "paper",
                      "text": label, "showarrow": False,
                      "font": {"size": 10 if crowded else 11, "color": "#0277bd" if col.get("frozen") else "#222"}})
        notes.append({"x": col["x"], "y": -0.03, "xref": "x", "yref": "paper", "text": col["caption"],
                      "showarrow": False, "font": {"size": 10, "color": "#777"}})
        if col.get("frozen"):
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": col["x"] - 0.3, "x1": col["x"] + 0.3,
                           "y0": 0, "y1": 1, "fillcolor": "rgba(41,182,246,0.15)", "line": {"width": 0},
                           "layer": "below"})
    if odd:
        notes.append({"x": 0.0, "y": 1.11, "xref": "paper", "yref": "paper", "xanchor": "left", "showarrow": False,
                      "text": f"⚠ {len(odd)} of {len(nodes)} nodes hold NaN or ±inf statistics (outlined red: "
                              f"diverged?); colours and paths use the finite values", "font": {"size": 11,
                                                                                               "color": ODD_COLOUR}})
    if not columns:
        notes.append({"x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "text": NO_LAYER, "showarrow": False,
                      "font": {"size": 13, "color": "#555"}})
    fig.update_layout(shapes=shapes, annotations=notes, margin={"l": 10, "r": 10, "t": 75 if odd else 55, "b": 30},
                      xaxis={"visible": False, "range": [-0.6, max(0.6, len(columns) - 0.4)]},
                      yaxis={"visible": False, "range": [-0.02, 1.02]}, plot_bgcolor="white",
                      uirevision="network", hovermode="closest")
    return fig, len(fig.data) - 1
