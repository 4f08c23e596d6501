"""The snapshot comparison's figures: the per-layer change heat map, a layer's difference histograms and per-filter
bars, and one filter's weights and activations side by side (A, B, their difference and log change)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..analysis.compare import log_change, zero_floor
from ..viewmodels.images import mosaic

MEASURES = {"rel_l2": "relative L2 ‖b−a‖/‖a‖", "one_minus_cos": "1 − cosine", "log_median": "median |ln(|b|/|a|)|",
            "sign_flips": "share of sign flips"}


def comparison_network_figure(comp, measure: str) -> go.Figure:
    rows = comp.network()
    names = [r["layer"] for r in rows]

    def value(r, prefix=""):
        if measure == "one_minus_cos":
            v = r[prefix + "cosine"] if prefix else r["cosine"]
            return None if v is None else 1 - v
        key = {"rel_l2": "rel_l2", "log_median": "log_median", "sign_flips": "sign_flips"}[measure]
        if prefix:
            key = {"rel_l2": "act_rel_l2"}.get(measure, "act_rel_l2")
        return r.get(key)

    params = [value(r) for r in rows]
    acts = [value(r, "act_") if measure in ("rel_l2", "one_minus_cos") else r["act_rel_l2"] for r in rows]
    text = [f"{r['kept']} kept" + (f", +{r['new']} new" if r["new"] else "") +
            (f", −{r['removed']} removed" if r["removed"] else "") for r in rows]
    z = np.array([[np.nan if v is None else v for v in params], [np.nan if v is None else v for v in acts]], float)
    with np.errstate(invalid="ignore", divide="ignore"):     # colour: each row relative to its own maximum
        top = np.nanmax(np.where(np.isfinite(z), np.abs(z), np.nan), axis=1, keepdims=True) \
            if np.isfinite(z).any() else np.ones((2, 1))
        shade = z / np.where(np.isfinite(top) & (top > 0), top, 1)
    fig = go.Figure(go.Heatmap(z=shade, x=names, y=["parameters", "activations (probes)"], colorscale="YlOrRd",
                               zmin=0, zmax=1,
                               text=[[f"{v:.3g}" if np.isfinite(v) else "" for v in z[0]],
                                     [f"{v:.3g}" if np.isfinite(v) else "" for v in z[1]]],
                               texttemplate="%{text}", customdata=[text, text],
                               hovertemplate="%{x}<br>%{y}: %{text}<br>%{customdata}<extra></extra>",
                               colorbar={"title": {"text": "share of the row's largest"}}))
    for i, r in enumerate(rows):
        if r["new"] or r["removed"]:
            fig.add_annotation(x=names[i], y=1.5, text=f"+{r['new']} / −{r['removed']}", showarrow=False,
                               font={"size": 11, "color": "#1b5e20"}, yanchor="bottom")
    label = MEASURES[measure] if measure != "sign_flips" else "share of sign flips (activations: rel L2)"
    fig.update_layout(margin={"l": 130, "r": 10, "t": 30, "b": 40}, title={"text": f"network: {label} per layer",
                                                                          "font": {"size": 13}})
    return fig


def layer_figures(comp, layer: str):
    lc = comp.layers[layer]
    diff = (lc.wb - lc.wa).ravel()

    fa = lc.wa.reshape(len(lc.kept), -1)
    log, kind = log_change(fa, lc.wb.reshape(len(lc.kept), -1), zero_floor(fa))
    hist = go.Figure()
    hist.add_trace(go.Histogram(x=diff, nbinsx=60, name="b − a", marker_color="#1565c0", opacity=0.75))
    hist.add_trace(go.Histogram(x=log[kind == 0].ravel(), nbinsx=60, name="ln(|b|/|a|)", xaxis="x2",
                                marker_color="#8e24aa", opacity=0.6))
    counts = ", ".join(f"{k}: {v}" for k, v in lc.kind_counts.items())
    hist.update_layout(title={"text": f"{layer}: parameter differences ({lc.inputs_matched})<br>"
                                      f"<sup>{counts}</sup>", "font": {"size": 12}},
                       xaxis={"domain": [0, 0.48], "title": "b − a"}, xaxis2={"domain": [0.52, 1], "title":
                                                                             "log change (normal pairs)"},
                       barmode="overlay", margin={"l": 40, "r": 10, "t": 60, "b": 40}, showlegend=False)
    ids = lc.kept + lc.new + lc.removed
    status = ["kept"] * len(lc.kept) + ["new"] * len(lc.new) + ["removed"] * len(lc.removed)
    bars = go.Figure()
    bars.add_trace(go.Bar(x=[str(i) for i in lc.kept], y=lc.filter_rel_l2, name="kept: rel L2",
                          marker_color="#1565c0", customdata=lc.kept,
                          hovertemplate="filter %{customdata}: rel L2 %{y:.4g}<extra></extra>"))
    if lc.act_rel_l2 is not None:
        bars.add_trace(go.Scatter(x=[str(i) for i in lc.kept], y=lc.act_rel_l2, mode="markers",
                                  name="activation rel L2", marker={"color": "#ef6c00", "size": 6}, yaxis="y2",
                                  customdata=lc.kept))
    top = float(np.nanmax(lc.filter_rel_l2)) if len(lc.kept) and np.isfinite(lc.filter_rel_l2).any() else 1.0
    for group, colour in (("new", "#2e7d32"), ("removed", "#c62828")):
        members = [i for i, s in zip(ids, status) if s == group]
        if members:
            bars.add_trace(go.Bar(x=[str(i) for i in members], y=[top] * len(members), name=group,
                                  marker={"color": "rgba(0,0,0,0)", "line": {"color": colour, "width": 2}},
                                  text=[group] * len(members), textposition="inside", customdata=members,
                                  hovertemplate="filter %{customdata}: " + group + "<extra></extra>"))
    bars.update_layout(title={"text": "per-filter change (new / removed by filter id)", "font": {"size": 12}},
                       xaxis={"type": "category", "title": "filter id"}, yaxis={"title": "rel L2 (params)"},
                       yaxis2={"overlaying": "y", "side": "right", "title": "rel L2 (act)", "showgrid": False},
                       margin={"l": 50, "r": 50, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.25},
                       bargap=0.15)
    return hist, bars


def channel_mosaic(w: np.ndarray | None) -> np.ndarray | None:
    """[in, kh, kw] → a 2-D tile of the input channels (NaN gutters); [in, kd, kh, kw] → a tile of every depth
    slice of every input channel; [in, k] stays 2-D."""
    if w is None:
        return None
    w = np.asarray(w, float)
    if w.ndim == 2:
        return w
    w = w.reshape(-1, *w.shape[-2:])
    return mosaic(list(w), ncols=int(np.ceil(np.sqrt(len(w)))), pad=1, fill=np.nan, border=False)


#: Each panel's colour scale title (the scales sit under their panels).
SCALE_TITLES = {1: "weight A", 2: "weight B", 3: "B − A", 4: "ln(|b|/|a|)", 5: "activation A", 6: "activation B"}


def filter_figure(pair: dict, probe: int) -> go.Figure:
    titles = ["A", "B", "B − A", "ln(|b|/|a|)", "activation A", "activation B"]
    fig = make_subplots(rows=1, cols=6, subplot_titles=titles, horizontal_spacing=0.03)
    tiles = [channel_mosaic(pair.get(key)) for key in ("a", "b", "diff", "log")]
    both = np.concatenate([t.ravel() for t in tiles[:2] if t is not None] + [np.zeros(0)])
    both = np.abs(both[np.isfinite(both)])   # a diverged run's NaN and ±inf are drawn as gaps, not the scale
    scale = float(both.max()) if both.size and both.max() > 0 else 1.0
    for col, tile in enumerate(tiles, start=1):
        if tile is None:
            continue
        symmetric = {"zmid": 0} if col >= 3 else {"zmin": -scale, "zmax": scale}
        fig.add_trace(go.Heatmap(z=tile, colorscale="RdBu_r", colorbar=_scale_under(fig, col), **symmetric),
                      row=1, col=col)
    for col, key in ((5, "act_a"), (6, "act_b")):
        act = pair.get(key)
        if act is not None and probe < len(act):
            a = np.asarray(act[probe], float)
            # a 3-D conv's map: its depth slices
            z = a if a.ndim == 2 else channel_mosaic(a) if a.ndim > 2 else a[None]
            fig.add_trace(go.Heatmap(z=z, colorscale="Viridis", colorbar=_scale_under(fig, col)), row=1, col=col)
    # cells, not a plot: no gridlines or zero lines over them, square pixels
    fig.update_yaxes(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    for col in range(1, 7):
        fig.update_yaxes(scaleanchor=f"x{'' if col == 1 else col}", row=1, col=col)
    status = pair.get("status")
    extra = f" rel L2 {pair['rel_l2']:.4g}, cosine {pair['cosine']:.4f}" if status == "kept" else f" ({status})"
    fig.update_layout(title={"text": f"{pair['layer']} filter {pair['filter_id']}:{extra}", "font": {"size": 12}},
                      margin={"l": 10, "r": 10, "t": 60, "b": 70}, plot_bgcolor="rgba(0,0,0,0)")
    return fig


def _scale_under(fig: go.Figure, col: int) -> dict:
    """A horizontal colour scale under the panel in column ``col``, as wide as the panel, titled with what it shows."""
    axis = fig.layout["xaxis" if col == 1 else f"xaxis{col}"]
    low, high = axis.domain
    return {"orientation": "h", "x": (low + high) / 2, "xanchor": "center", "len": high - low, "lenmode": "fraction",
            "y": -0.08, "yanchor": "top", "thickness": 8, "tickfont": {"size": 9},
            "title": {"text": SCALE_TITLES[col], "side": "bottom", "font": {"size": 10}}}
