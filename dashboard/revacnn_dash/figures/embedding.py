"""The embedding view's figure: one point per filter of a layer, placed by PCA, t-SNE or UMAP."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from .network import colour_values


LABELLED_POINTS = 64   # past this many filters an index on every point is a carpet of text: on hover only


def embedding_figure(result: dict[str, Any], colour: str, layer: str, source: str, method: str, step) -> go.Figure:
    coords = np.array(result["coords"], dtype=float).reshape(-1, 2)
    many = len(coords) > LABELLED_POINTS
    size = 12 if not many else 7
    bad = ~np.isfinite(coords).all(axis=1)
    coords = np.where(np.isfinite(coords), coords, 0.0)   # a diverged layout's points drawn at 0, and said so
    if colour == "cluster" and "cluster" in result:
        palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
        marker = {"size": size, "color": [palette[int(k) % len(palette)] for k in result["cluster"]]}
    else:
        marker = {"size": size, "color": colour_values(np.asarray(result.get("grad", []), dtype=float)), "colorscale": "Inferno", "showscale": True,
                  "colorbar": {"title": {"text": "mean |grad|"}}}
    ids = result["ids"]
    fig = go.Figure(go.Scatter(
        x=coords[:, 0], y=coords[:, 1], mode="markers" if many else "markers+text", text=[str(i) for i in range(len(coords))],
        textposition="top center", textfont={"size": 9}, customdata=ids,
        hovertemplate="filter %{text} (id %{customdata})<extra></extra>",
        marker=marker))
    if colour == "cluster" and "cluster" in result:   # the colours' legend: one entry per cluster, after the points
        for k in sorted({int(k) for k in result["cluster"]}):
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"cluster {k}",
                                     marker={"size": 10, "color": palette[k % len(palette)]}))
        fig.update_layout(showlegend=True, legend={"title": {"text": "k-means cluster"}})
    if bad.any():
        fig.add_annotation(x=0, y=1, xref="paper", yref="paper", xanchor="left", showarrow=False,
                           text=f"⚠ {int(bad.sum())} of {len(coords)} points have NaN or ±inf coordinates: drawn at 0",
                           font={"size": 11, "color": "#c62828"})
    fig.update_layout(
        margin={"l": 30, "r": 10, "t": 30, "b": 30}, title={"text": f"{method.upper()} · {layer} · {source} · "
                                                                    f"step {step}", "font": {"size": 13}},
        uirevision=f"{layer}-{source}-{method}", plot_bgcolor="#fafafa", hovermode="closest")
    return fig
