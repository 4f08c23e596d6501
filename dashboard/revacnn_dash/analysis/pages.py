"""Dash pages of the analysis views: snapshot comparison and training-log explorer.

    source = RunSource(["lightning_logs"])
    layout = html.Div([comparison_layout(source), explorer_layout(source)])   # or one per dcc.Tab
    register_analysis_callbacks(app, source)

Given ``page_ticks`` (the ids of two components whose data changes on every refresh while the explorer or the
comparison is shown: revacnn-dash's tab ticks), the pages follow runs that are still being recorded: at most every
``LIVE_REFRESH_S`` seconds, and only when the run directory got new data, their views read the log again.

Component ids start with ``anc-`` (comparison) and ``ane-`` (explorer), so the pages can sit next to other views.
Both layouts must be in the app's layout (or ``app.config.suppress_callback_exceptions=True`` when they are
rendered lazily, e.g. in tabs whose content is produced by a callback).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import ALL, Input, Output, State, ctx, dcc, html, no_update

from revacnn.recording.reader import list_runs, open_run

try:    # plotly's JSON encoder imports pandas lazily; two server threads doing that at once can hit a half-imported
    import pandas  # noqa: F401  module ("partially initialized module 'pandas'"), so import it here, once
except ImportError:  # pragma: no cover - pandas is optional
    pass

from .compare import compare_snapshots
from .explorer import CHART_FIELDS, build_tree, filter_chart, horizon_bands, layer_overview, steering_events
from .tracking import anomalies, cube, overlap_with

__all__ = ["RunSource", "comparison_layout", "explorer_layout", "register_analysis_callbacks"]

MEASURES = {"rel_l2": "relative L2 ‖b−a‖/‖a‖", "one_minus_cos": "1 − cosine", "log_median": "median |ln(|b|/|a|)|",
            "sign_flips": "share of sign flips"}
OVERVIEW_FIELDS = ("grad_weight_ratio", "update_ratio", "grad_sq_mean", "grad_abs_mean", "weight_norm",
                   "act_abs_mean")
PIN_COLOUR, STEER_COLOUR = "#6a1b9a", "#ef6c00"
LIVE_REFRESH_S = 5.0    # a page follows a run still being recorded at most this often (its views re-read the log)


class RunSource:
    """Recorded runs under some directories (searched with ``list_runs``) and/or given run directories; readers
    and comparisons are cached."""

    def __init__(self, paths) -> None:
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self._readers: dict[str, Any] = {}
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def runs(self) -> list[dict]:
        out, seen = [], set()
        for path in self.paths:
            found = [{"path": str(path), "run_id": path.name}] if (path / "run.json").exists() else list_runs(path)
            for run in found:
                if run["path"] not in seen:
                    seen.add(run["path"])
                    out.append(run)
        return out

    def options(self) -> list[dict]:
        return [{"label": f"{Path(r['path']).parent.name}/{r.get('run_id', '')}", "value": r["path"]}
                for r in self.runs()]

    def reader(self, path: str):
        with self._lock:
            if path not in self._readers:
                self._readers[path] = open_run(path)
            return self._readers[path]

    def version(self, path: str) -> float:
        """Changes when the run directory got new data (a live run): part of the cache keys of derived views."""
        try:
            return self.reader(path).last_write()
        except OSError:
            return 0.0

    def cached(self, key, make):
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > 16:
                self._cache.popitem(last=False)
        return value


def _first(options):
    return options[0]["value"] if options else None


# -- layouts -----------------------------------------------------------------------------------------------------
def comparison_layout(source: RunSource) -> html.Div:
    """The snapshot comparison page: pick run/step A (reference) and run/step B."""
    options = source.options()
    run = _first(options)
    steps = source.reader(run).snapshot_steps() if run else []
    step_opts = [{"label": str(s), "value": s} for s in steps]
    pick = lambda label, rid, sid, sval: html.Div([  # noqa: E731
        html.B(label), dcc.Dropdown(id=rid, options=options, value=run, clearable=False, style={"width": "360px"}),
        dcc.Dropdown(id=sid, options=step_opts, value=sval, clearable=False, style={"width": "120px"})],
        style={"display": "flex", "gap": "8px", "alignItems": "center"})
    return html.Div(id="anc-page", children=[
        html.H3("Snapshot comparison"), dcc.Store(id="anc-live"),
        pick("A", "anc-run-a", "anc-step-a", steps[0] if steps else None),
        pick("B", "anc-run-b", "anc-step-b", steps[-1] if steps else None),
        html.Div([html.Span("colour by "), dcc.RadioItems(id="anc-measure", value="rel_l2", inline=True,
                                                           options=[{"label": v, "value": k}
                                                                    for k, v in MEASURES.items()])]),
        html.Div(id="anc-summary", style={"fontSize": "13px", "margin": "4px 0"}),
        dcc.Graph(id="anc-network", config={"displaylogo": False}, style={"height": "260px"}),
        html.Div([html.B("layer "), dcc.Dropdown(id="anc-layer", clearable=False, style={"width": "300px"})],
                 style={"display": "flex", "gap": "8px", "alignItems": "center"}),
        html.Div([dcc.Graph(id="anc-layer-hist", style={"width": "50%", "height": "300px"}),
                  dcc.Graph(id="anc-filter-bars", style={"width": "50%", "height": "300px"})],
                 style={"display": "flex"}),
        html.Div([html.B("filter id "), dcc.Dropdown(id="anc-filter", clearable=False, style={"width": "160px"}),
                  html.Span("probe image "),
                  dcc.Slider(id="anc-probe", min=0, max=7, step=1, value=0, marks=None,
                             tooltip={"placement": "bottom"})],
                 style={"display": "flex", "gap": "8px", "alignItems": "center"}),
        dcc.Graph(id="anc-filter-view", style={"height": "420px"}),
    ])


def explorer_layout(source: RunSource) -> html.Div:
    """The training-log explorer page."""
    options = source.options()
    return html.Div(id="ane-page", children=[
        html.H3("Training-log explorer"),
        html.Div([dcc.Dropdown(id="ane-run", options=options, value=_first(options), clearable=False,
                               style={"width": "360px"}),
                  html.Span("overview field "),
                  dcc.Dropdown(id="ane-field", value="grad_weight_ratio", clearable=False, style={"width": "200px"},
                               options=[{"label": f, "value": f} for f in OVERVIEW_FIELDS]),
                  html.Button("clear pins", id="ane-clear-pins"),
                  html.Button("reset zoom", id="ane-reset-zoom")],
                 style={"display": "flex", "gap": "8px", "alignItems": "center"}),
        dcc.Store(id="ane-node"), dcc.Store(id="ane-pins", data=[]), dcc.Store(id="ane-xrange", data=None),
        dcc.Store(id="ane-cube-pick", data=None), dcc.Store(id="ane-live"),
        html.Div([
            html.Div(id="ane-tree", style={"width": "220px", "fontSize": "12px", "overflowY": "auto",
                                           "maxHeight": "640px", "flex": "none"}),
            html.Div([html.Div(id="ane-crumbs", style={"fontSize": "13px"}),
                      dcc.Graph(id="ane-multiples", config={"displaylogo": False}),
                      html.Div(id="ane-leaf", style={"display": "none"}, children=[
                          html.Div([html.Span("filter × iteration "),
                                    dcc.Dropdown(id="ane-chart-field", value="cosine", clearable=False,
                                                 style={"width": "180px"},
                                                 options=[{"label": f, "value": f} for f in CHART_FIELDS]),
                                    html.Span("order "),
                                    dcc.RadioItems(id="ane-order", value="pca", inline=True,
                                                   options=["pca", "spectral", "none"])],
                                   style={"display": "flex", "gap": "8px", "alignItems": "center"}),
                          dcc.Graph(id="ane-filter-chart", style={"height": "420px"})])],
                     style={"flex": "1", "minWidth": "0"})], style={"display": "flex", "gap": "8px"}),
        html.H4("Validation images × iterations"),
        html.Div([html.Span("window d "), dcc.Input(id="ane-window", type="number", value=3, min=1, step=1,
                                                    style={"width": "60px"}),
                  html.Span("threshold "), dcc.Input(id="ane-threshold", type="number", value=5, min=1, step=1,
                                                     style={"width": "60px"}),
                  dcc.RadioItems(id="ane-direction", value="backward", inline=True,
                                 options=["backward", "forward", "both"]),
                  html.Span("class "), dcc.Dropdown(id="ane-class", value=0, clearable=False,
                                                    style={"width": "80px"},
                                                    options=[{"label": str(c), "value": c} for c in range(10)]),
                  html.Span("top-k "), dcc.Input(id="ane-k", type="number", value=10, min=1, step=1,
                                                 style={"width": "60px"})],
                 style={"display": "flex", "gap": "8px", "alignItems": "center"}),
        html.Div(id="ane-val-summary", style={"fontSize": "13px"}),
        dcc.Graph(id="ane-heatlines", style={"height": "300px"}),
        dcc.Graph(id="ane-images", style={"height": "320px"}),
        html.H4("Cube: layers × flagged classes (by iteration)"),
        dcc.Graph(id="ane-cube", style={"height": "360px"}),
        html.Div(id="ane-cube-detail", style={"fontSize": "13px", "whiteSpace": "pre-wrap"}),
    ])


# -- figure helpers ----------------------------------------------------------------------------------------------
def _time_marks(fig: go.Figure, pins, events, yref: str = "paper") -> None:
    for event in events:
        fig.add_vline(x=event["step"], line_dash="dash", line_color=STEER_COLOUR, line_width=1)
        fig.add_annotation(x=event["step"], y=1.0, yref="paper", text=event["label"], showarrow=False,
                           font={"size": 9, "color": STEER_COLOUR}, xanchor="left", yanchor="bottom")
    for pin in pins or []:
        fig.add_vline(x=pin, line_color=PIN_COLOUR, line_width=1.5)


def _network_figure(comp, measure: str) -> go.Figure:
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


def _layer_figures(comp, layer: str):
    lc = comp.layers[layer]
    diff = (lc.wb - lc.wa).ravel()
    from .compare import log_change, zero_floor

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


def _mosaic(w: np.ndarray | None) -> np.ndarray | None:
    """[in, kh, kw] → a 2-D tile of the input channels (NaN gutters); [in, kd, kh, kw] → a tile of every depth
    slice of every input channel; [in, k] stays 2-D."""
    if w is None:
        return None
    w = np.asarray(w, float)
    if w.ndim == 2:
        return w
    w = w.reshape(-1, *w.shape[-2:])
    n, kh, kw = w.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * (kh + 1), cols * (kw + 1)), np.nan)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (kh + 1):r * (kh + 1) + kh, c * (kw + 1):c * (kw + 1) + kw] = w[i]
    return out


def _filter_figure(pair: dict, probe: int) -> go.Figure:
    from plotly.subplots import make_subplots

    titles = ["A", "B", "B − A", "ln(|b|/|a|)", "activation A", "activation B"]
    fig = make_subplots(rows=1, cols=6, subplot_titles=titles, horizontal_spacing=0.03)
    tiles = [_mosaic(pair.get("a")), _mosaic(pair.get("b")), _mosaic(pair.get("diff")), _mosaic(pair.get("log"))]
    scale = np.nanmax(np.abs(np.concatenate([t.ravel() for t in tiles[:2] if t is not None]))) \
        if any(t is not None for t in tiles[:2]) else 1
    for col, tile in enumerate(tiles, start=1):
        if tile is None:
            continue
        symmetric = {"zmid": 0} if col >= 3 else {"zmin": -scale, "zmax": scale}
        fig.add_trace(go.Heatmap(z=tile, colorscale="RdBu_r", showscale=False, **symmetric), row=1, col=col)
    for col, key in ((5, "act_a"), (6, "act_b")):
        act = pair.get(key)
        if act is not None and probe < len(act):
            a = np.asarray(act[probe], float)
            z = a if a.ndim == 2 else _mosaic(a) if a.ndim > 2 else a[None]  # a 3-D conv's map: its depth slices
            fig.add_trace(go.Heatmap(z=z, colorscale="Viridis", showscale=False), row=1, col=col)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    status = pair.get("status")
    extra = f" rel L2 {pair['rel_l2']:.4g}, cosine {pair['cosine']:.4f}" if status == "kept" else f" ({status})"
    fig.update_layout(title={"text": f"{pair['layer']} filter {pair['filter_id']}:{extra}", "font": {"size": 12}},
                      margin={"l": 10, "r": 10, "t": 60, "b": 10})
    return fig


def _multiples_figure(overview: dict, tree: dict, focus: str, pins, events, xrange) -> go.Figure:
    """One figure, one x axis, one y axis per row (linked hover with hoversubplots='axis'): for the focused node
    and each child, a min–max band, a q1–q3 band and the median sparkline, then a thin horizon chart."""
    nodes = [focus] + [c for c in tree["nodes"][focus]["children"] if c in overview["nodes"]]
    nodes = [n for n in nodes if n in overview["nodes"]]
    fig = go.Figure()
    rows = len(nodes)
    unit = 1.0 / max(rows, 1)
    layout: dict[str, Any] = {}
    blues = ["#c6dbef", "#6baed6", "#08519c"]
    reds = ["#fcbba1", "#fb6a4a", "#a50f15"]
    for r, node_id in enumerate(nodes):
        data = overview["nodes"][node_id]
        x = data["step"]
        top = 1 - r * unit
        band_axis, horizon_axis = 2 * r + 1, 2 * r + 2
        ya, yh = ("y" if band_axis == 1 else f"y{band_axis}"), f"y{horizon_axis}"
        layout["yaxis" if band_axis == 1 else f"yaxis{band_axis}"] = {
            "domain": [top - unit * 0.72, top - unit * 0.06], "title": {"text": tree["nodes"][node_id]["name"],
                                                                       "font": {"size": 10}},
            "tickfont": {"size": 8}, "type": "log" if np.nanmin(data["min"], initial=np.inf) > 0 else "linear"}
        layout[f"yaxis{horizon_axis}"] = {"domain": [top - unit * 0.98, top - unit * 0.74], "showticklabels": False,
                                          "range": [0, 1]}
        fig.add_trace(go.Scatter(x=x, y=data["max"], mode="lines", line={"width": 0}, yaxis=ya, showlegend=False,
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=data["min"], mode="lines", line={"width": 0}, fill="tonexty",
                                 fillcolor="rgba(21,101,192,0.15)", yaxis=ya, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=data["q3"], mode="lines", line={"width": 0}, yaxis=ya, showlegend=False,
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=data["q1"], mode="lines", line={"width": 0}, fill="tonexty",
                                 fillcolor="rgba(21,101,192,0.35)", yaxis=ya, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=data["median"], mode="lines", line={"width": 1.2, "color": "#0d47a1"},
                                 yaxis=ya, name=node_id, showlegend=False,
                                 customdata=np.stack([data["min"], data["q1"], data["q3"], data["max"]], 1),
                                 hovertemplate=f"{tree['nodes'][node_id]['name']}: median %{{y:.3g}} "
                                               "[min %{customdata[0]:.3g}, q1 %{customdata[1]:.3g}, "
                                               "q3 %{customdata[2]:.3g}, max %{customdata[3]:.3g}]<extra></extra>"))
        pos, neg, height = horizon_bands(np.log10(np.clip(data["median"], 1e-30, None))
                                         if layout["yaxis" if band_axis == 1 else f"yaxis{band_axis}"]["type"] ==
                                         "log" else data["median"])
        for k in range(pos.shape[0]):
            for arr, colours in ((pos, reds), (neg, blues)):
                fig.add_trace(go.Scatter(x=x, y=arr[k] / height, mode="lines", line={"width": 0},
                                         fill="tozeroy", fillcolor=colours[k], yaxis=yh, showlegend=False,
                                         hoverinfo="skip"))
    layout["xaxis"] = {"title": "step", "anchor": f"y{2 * rows}" if rows else "y", "showspikes": True,
                       "spikemode": "across", "spikethickness": 1}
    if xrange:
        layout["xaxis"]["range"] = xrange
    fig.update_layout(**layout)
    fig.update_layout(height=max(260, 110 * rows + 60), margin={"l": 70, "r": 10, "t": 30, "b": 40},
                      hovermode="x", hoversubplots="axis", dragmode="zoom",
                      title={"text": f"{overview['field']} per node — {overview['steps']} rows"
                                     + (" (raw steps)" if overview["raw"] else " (pyramid buckets)"),
                             "font": {"size": 12}})
    _time_marks(fig, pins, events)
    return fig


def _chart_figure(chart: dict, pins, events, xrange) -> go.Figure:
    steps = chart["step"]
    field = chart["field"]
    colours = {"cosine": "RdBu", "update_ratio": "Viridis"}.get(field, "Viridis")
    z = chart["values"]
    extra = {}
    if field == "cosine":
        finite = z[np.isfinite(z)]
        low = float(np.nanpercentile(finite, 2)) if finite.size else 0.9
        extra = {"zmin": min(low, 0.999), "zmax": 1.0}
    fig = go.Figure(go.Heatmap(z=z, x=steps, y=[str(i) for i in chart["filter_ids"]], colorscale=colours, **extra,
                               hovertemplate="step %{x}<br>filter %{y}<br>" + field + " %{z:.5g}<extra></extra>",
                               colorbar={"title": {"text": field}}))
    note = "" if chart["exact"] else " (pyramid buckets: cosine ≈ 1 − max(update_ratio)²/2)"
    fig.update_layout(title={"text": f"filters × iterations: {field}{note}", "font": {"size": 12}},
                      yaxis={"type": "category", "title": "filter id (similarity order)", "tickfont": {"size": 8}},
                      xaxis={"title": "step", **({"range": xrange} if xrange else {})},
                      margin={"l": 70, "r": 10, "t": 40, "b": 40})
    _time_marks(fig, pins, events)
    return fig


def _tree_children(tree: dict, node_id: str, focus: str | None) -> list:
    node = tree["nodes"][node_id]
    style = {"fontWeight": "bold" if node_id == focus else "normal", "border": "none", "background": "none",
             "cursor": "pointer", "padding": "1px 2px", "textAlign": "left",
             "color": "#0d47a1" if node["layer"] else "#333"}
    button = html.Button(node["name"], id={"type": "ane-node", "node": node_id}, style=style, n_clicks=0)
    kids = [_tree_children(tree, c, focus) for c in node["children"]]
    return html.Div([button] + ([html.Div(kids, style={"paddingLeft": "12px"})] if kids else []))


# -- callbacks ---------------------------------------------------------------------------------------------------
def register_analysis_callbacks(app, source: RunSource, page_ticks: tuple[str, str] | None = None) -> None:
    """Register the callbacks of both pages on ``app`` (a ``dash.Dash``). ``page_ticks``: the ids of the explorer's
    and the comparison's refresh ticks, to follow runs still being recorded (module docstring)."""

    def follow(runs: list[str | None], live: dict | None) -> dict | None:
        """A new ``*-live`` marker when a shown run's directory got data since the last one, at most every
        ``LIVE_REFRESH_S``; None when the views are up to date."""
        now = time.time()
        if live and now - live["at"] < LIVE_REFRESH_S:
            return None
        versions = [source.version(run) if run else None for run in runs]
        if live and versions == live["versions"]:
            return None
        return {"versions": versions, "at": now}

    if page_ticks is not None:
        explore_tick, compare_tick = page_ticks

        @app.callback(Output("ane-live", "data"), Output("ane-run", "options"), Input(explore_tick, "data"),
                      State("ane-run", "value"), State("ane-live", "data"), prevent_initial_call=True)
        def _follow_explorer(_tick, run, live):
            marker = follow([run], live)
            return (no_update, no_update) if marker is None else (marker, source.options())

        @app.callback(Output("anc-live", "data"), Output("anc-run-a", "options"), Output("anc-run-b", "options"),
                      Input(compare_tick, "data"), State("anc-run-a", "value"), State("anc-run-b", "value"),
                      State("anc-live", "data"), prevent_initial_call=True)
        def _follow_comparison(_tick, run_a, run_b, live):
            marker = follow([run_a, run_b], live)
            if marker is None:
                return no_update, no_update, no_update
            options = source.options()
            return marker, options, options

    def comparison(run_a, step_a, run_b, step_b):
        def make():
            ra, rb = source.reader(run_a), source.reader(run_b)
            return compare_snapshots(ra.snapshot(step_a), rb.snapshot(step_b), ra.structures(), rb.structures())
        return source.cached(("cmp", run_a, step_a, run_b, step_b), make)

    def step_menu(run, current, first: bool):
        """A run's snapshot steps as menu options, and the step to show: ``current`` if the run has it, else its
        first or last. Following a live run, an unchanged step is not sent again: the comparison is not redrawn."""
        steps = source.reader(run).snapshot_steps() if run else []
        value = current if current in steps else (steps[0 if first else -1] if steps else None)
        if ctx.triggered_id == "anc-live" and value == current:
            value = no_update
        return [{"label": str(s), "value": s} for s in steps], value

    @app.callback(Output("anc-step-a", "options"), Output("anc-step-a", "value"), Input("anc-run-a", "value"),
                  Input("anc-live", "data"), State("anc-step-a", "value"))
    def _steps_a(run, _live, current):
        return step_menu(run, current, first=True)

    @app.callback(Output("anc-step-b", "options"), Output("anc-step-b", "value"), Input("anc-run-b", "value"),
                  Input("anc-live", "data"), State("anc-step-b", "value"))
    def _steps_b(run, _live, current):
        return step_menu(run, current, first=False)

    @app.callback(Output("anc-network", "figure"), Output("anc-layer", "options"), Output("anc-layer", "value"),
                  Output("anc-summary", "children"),
                  Input("anc-run-a", "value"), Input("anc-step-a", "value"), Input("anc-run-b", "value"),
                  Input("anc-step-b", "value"), Input("anc-measure", "value"), State("anc-layer", "value"))
    def _network(run_a, step_a, run_b, step_b, measure, layer):
        if None in (run_a, step_a, run_b, step_b):
            return go.Figure(), [], None, "pick two snapshots"
        comp = comparison(run_a, step_a, run_b, step_b)
        names = list(comp.layers)
        summary = (f"A = step {step_a}, B = step {step_b}; probe images "
                   + ("identical: activations compared" if comp.probes_comparable else
                      "differ: activations not compared"))
        return (_network_figure(comp, measure), [{"label": n, "value": n} for n in names],
                layer if layer in names else (names[0] if names else None), summary)

    @app.callback(Output("anc-layer-hist", "figure"), Output("anc-filter-bars", "figure"),
                  Output("anc-filter", "options"), Output("anc-filter", "value"),
                  Input("anc-layer", "value"), Input("anc-filter-bars", "clickData"),
                  State("anc-run-a", "value"), State("anc-step-a", "value"), State("anc-run-b", "value"),
                  State("anc-step-b", "value"), State("anc-filter", "value"))
    def _layer(layer, click, run_a, step_a, run_b, step_b, current):
        if layer is None or None in (run_a, step_a, run_b, step_b):
            return go.Figure(), go.Figure(), [], None
        comp = comparison(run_a, step_a, run_b, step_b)
        if layer not in comp.layers:
            return go.Figure(), go.Figure(), [], None
        lc = comp.layers[layer]
        ids = lc.kept + lc.new + lc.removed
        if ctx.triggered_id == "anc-filter-bars" and click:
            value = int(click["points"][0]["x"])
        else:
            value = current if current in ids else (ids[int(np.nanargmax(lc.filter_rel_l2))]
                                                    if len(lc.kept) and np.isfinite(lc.filter_rel_l2).any()
                                                    else (ids[0] if ids else None))
        hist, bars = _layer_figures(comp, layer)
        options = [{"label": f"{i}" + ("" if i in lc.kept else (" (new)" if i in lc.new else " (removed)")),
                    "value": i} for i in ids]
        return hist, bars, options, value

    @app.callback(Output("anc-filter-view", "figure"), Output("anc-probe", "max"), Input("anc-filter", "value"),
                  Input("anc-probe", "value"), State("anc-layer", "value"), State("anc-run-a", "value"),
                  State("anc-step-a", "value"), State("anc-run-b", "value"), State("anc-step-b", "value"))
    def _filter(filter_id, probe, layer, run_a, step_a, run_b, step_b):
        if filter_id is None or layer is None or None in (run_a, step_a, run_b, step_b):
            return go.Figure(), 7
        comp = comparison(run_a, step_a, run_b, step_b)
        pair = comp.filter_pair(layer, int(filter_id))
        act = pair.get("act_b") if pair.get("act_b") is not None else pair.get("act_a")
        return _filter_figure(pair, int(probe or 0)), max(0, (len(act) if act is not None else 1) - 1)

    # -- explorer --
    def tree_of(run):
        return source.cached(("tree", run, source.version(run)),
                             lambda: build_tree(source.reader(run).layer_names()))

    @app.callback(Output("ane-node", "data"), Input("ane-run", "value"),
                  Input({"type": "ane-node", "node": ALL}, "n_clicks"), State("ane-node", "data"))
    def _focus(run, clicks, current):
        if ctx.triggered_id == "ane-run" or not run:
            return tree_of(run)["root"] if run else None
        if isinstance(ctx.triggered_id, dict) and any(clicks or []):
            return ctx.triggered_id["node"]
        return current or (tree_of(run)["root"] if run else None)

    def focus_in(tree, focus):
        """``focus`` if the tree (re-read from a live run: a layer may have been removed) still has it, else its
        root."""
        return focus if focus in tree["nodes"] else tree["root"]

    @app.callback(Output("ane-tree", "children"), Output("ane-crumbs", "children"), Input("ane-node", "data"),
                  Input("ane-live", "data"), State("ane-run", "value"))
    def _tree(focus, _live, run):
        if not run or focus is None:
            return [], ""
        tree = tree_of(run)
        focus = focus_in(tree, focus)
        crumbs, node = [], focus
        while node is not None:
            crumbs.insert(0, tree["nodes"][node]["name"])
            node = tree["nodes"][node]["parent"]
        return _tree_children(tree, tree["root"], focus), " → ".join(crumbs)

    @app.callback(Output("ane-pins", "data"), Input("ane-multiples", "clickData"),
                  Input("ane-filter-chart", "clickData"), Input("ane-heatlines", "clickData"),
                  Input("ane-cube-pick", "data"), Input("ane-clear-pins", "n_clicks"), State("ane-pins", "data"),
                  prevent_initial_call=True)
    def _pins(c1, c2, c3, pick, clear, pins):
        pins = list(pins or [])
        trig = ctx.triggered_id
        if trig == "ane-clear-pins":
            return []
        if trig == "ane-cube-pick":
            step = pick.get("step") if pick else None
        else:
            click = {"ane-multiples": c1, "ane-filter-chart": c2, "ane-heatlines": c3}.get(trig)
            step = click["points"][0].get("x") if click and click.get("points") else None
        if step is None:
            return no_update
        step = int(round(float(step)))
        if step in pins and trig != "ane-cube-pick":
            pins.remove(step)
        elif step not in pins:
            pins.append(step)
        return sorted(pins)

    @app.callback(Output("ane-xrange", "data"), Input("ane-multiples", "relayoutData"),
                  Input("ane-filter-chart", "relayoutData"), Input("ane-reset-zoom", "n_clicks"),
                  Input("ane-run", "value"), prevent_initial_call=True)
    def _zoom(r1, r2, reset, run):
        trig = ctx.triggered_id
        if trig in ("ane-reset-zoom", "ane-run"):
            return None
        data = r1 if trig == "ane-multiples" else r2
        if not data:
            return no_update
        if data.get("xaxis.autorange"):
            return None
        if "xaxis.range[0]" in data:
            return [data["xaxis.range[0]"], data["xaxis.range[1]"]]
        if "xaxis.range" in data:
            return list(data["xaxis.range"])
        return no_update

    def bounds(xrange):
        if not xrange:
            return None, None
        return int(np.floor(float(xrange[0]))), int(np.ceil(float(xrange[1]))) + 1

    @app.callback(Output("ane-multiples", "figure"), Output("ane-leaf", "style"),
                  Input("ane-node", "data"), Input("ane-field", "value"), Input("ane-pins", "data"),
                  Input("ane-xrange", "data"), Input("ane-live", "data"), State("ane-run", "value"))
    def _multiples(focus, field, pins, xrange, _live, run):
        if not run or focus is None:
            return go.Figure(), {"display": "none"}
        reader = source.reader(run)
        tree = tree_of(run)
        focus = focus_in(tree, focus)
        start, stop = bounds(xrange)
        overview = layer_overview(reader, tree, start, stop, resolution=400, field=field)
        leaf = tree["nodes"][focus]["layer"] is not None
        return (_multiples_figure(overview, tree, focus, pins, steering_events(reader), xrange),
                {"display": "block"} if leaf else {"display": "none"})

    @app.callback(Output("ane-filter-chart", "figure"), Input("ane-node", "data"),
                  Input("ane-chart-field", "value"), Input("ane-order", "value"), Input("ane-pins", "data"),
                  Input("ane-xrange", "data"), Input("ane-live", "data"), State("ane-run", "value"))
    def _chart(focus, field, order, pins, xrange, _live, run):
        if not run or focus is None:
            return go.Figure()
        tree = tree_of(run)
        layer = tree["nodes"][focus_in(tree, focus)]["layer"]
        if layer is None:
            return go.Figure()
        reader = source.reader(run)
        start, stop = bounds(xrange)
        chart = filter_chart(reader, layer, field, start, stop, resolution=600, order=order)
        return _chart_figure(chart, pins, steering_events(reader), xrange)

    def val_info(run, window, threshold, direction):
        return source.cached(("val", run, source.version(run), window, threshold, direction),
                             lambda: anomalies(source.reader(run).val_predictions(), int(window or 3),
                                               int(threshold or 5), direction or "backward"))

    @app.callback(Output("ane-heatlines", "figure"), Output("ane-images", "figure"),
                  Output("ane-val-summary", "children"),
                  Input("ane-run", "value"), Input("ane-window", "value"), Input("ane-threshold", "value"),
                  Input("ane-direction", "value"), Input("ane-class", "value"), Input("ane-pins", "data"),
                  Input("ane-live", "data"))
    def _validation(run, window, threshold, direction, klass, pins, _live):
        if not run:
            return go.Figure(), go.Figure(), ""
        info = val_info(run, window, threshold, direction)
        events = steering_events(source.reader(run))
        steps = info["steps"]
        heat = go.Figure(go.Heatmap(z=info["error"], x=steps, y=[str(c) for c in range(info["classes"])],
                                    colorscale="Reds", zmin=0, zmax=1, colorbar={"title": {"text": "error"}},
                                    text=info["counts"], texttemplate="%{text}",
                                    hovertemplate="class %{y}, step %{x}<br>error %{z:.2f}<br>"
                                                  "anomalous images %{text}<extra></extra>"))
        fc, ft = np.nonzero(info["flagged"])
        if len(fc):
            heat.add_trace(go.Scatter(x=steps[ft], y=[str(c) for c in fc], mode="markers", name="flagged",
                                      marker={"symbol": "square-open", "size": 16, "color": "#000",
                                              "line": {"width": 2}}, hoverinfo="skip"))
        heat.update_layout(title={"text": "per-class error (numbers: anomalous images; boxes: flagged classes)",
                                  "font": {"size": 12}}, xaxis={"title": "step"}, yaxis={"title": "class"},
                           margin={"l": 50, "r": 10, "t": 40, "b": 40})
        _time_marks(heat, pins, events)
        klass = int(klass or 0)
        cols = np.nonzero(info["labels"] == klass)[0]
        z = np.where(info["valid"][:, cols], info["correct"][:, cols].astype(float), np.nan).T
        images = go.Figure(go.Heatmap(z=z, x=steps, y=[str(c) for c in cols],
                                      colorscale=[[0, "#c62828"], [1, "#e8f5e9"]], zmin=0, zmax=1, showscale=False,
                                      hovertemplate="image %{y}, step %{x}: %{z}<extra></extra>"))
        fi, fs = np.nonzero(info["flips"][:, cols].T)
        if len(fi):
            images.add_trace(go.Scatter(x=steps[fs], y=[str(cols[i]) for i in fi], mode="markers",
                                        name="stable → flipped", marker={"symbol": "x", "size": 6,
                                                                          "color": "#000"}))
        images.update_layout(title={"text": f"class {klass}: image × iteration correctness (green right, red wrong, "
                                            f"× anomalous)", "font": {"size": 12}},
                             xaxis={"title": "step"}, yaxis={"type": "category", "showticklabels": len(cols) < 60,
                                                             "title": "validation image"},
                             margin={"l": 50, "r": 10, "t": 40, "b": 40})
        _time_marks(images, pins, events)
        summary = (f"{len(steps)} validation samples × {info['correct'].shape[1]} images; window d={info['window']},"
                   f" threshold={info['threshold']}: {len(info['flagged_pairs'])} flagged (class, step) pairs")
        if not info["correct"].shape[1]:
            error = source.reader(run).val_predictions()["error"]
            summary = f"{len(steps)} validation samples, no image predictions" + (f": {error}" if error else "")
        return heat, images, summary

    @app.callback(Output("ane-cube-pick", "data"), Input("ane-cube", "clickData"), State("ane-cube-pick", "data"),
                  prevent_initial_call=True)
    def _pick(click, current):
        if not click or not click.get("points"):
            return no_update
        point = click["points"][0]          # Dash passes x and y labels for heatmaps (not customdata)
        x, y = str(point.get("x", "")), point.get("y")
        if "@" not in x or y is None:
            return no_update
        return {"layer": y, "column": x, "step": int(x.split("@")[1])}

    @app.callback(Output("ane-cube", "figure"), Output("ane-cube-detail", "children"), Input("ane-run", "value"),
                  Input("ane-window", "value"), Input("ane-threshold", "value"), Input("ane-direction", "value"),
                  Input("ane-k", "value"), Input("ane-cube-pick", "data"), Input("ane-live", "data"))
    def _cube(run, window, threshold, direction, k, pick, _live):
        if not run:
            return go.Figure(), ""
        info = val_info(run, window, threshold, direction)
        reader = source.reader(run)
        layers = reader.layer_names()
        data = source.cached(("cube", run, source.version(run), window, threshold, direction, k),
                             lambda: cube(reader, layers, info, int(k or 10)))
        if not data["columns"]:
            return go.Figure(layout={"title": {"text": "no flagged classes with these settings",
                                               "font": {"size": 12}},
                                     "xaxis": {"visible": False}, "yaxis": {"visible": False}}), ""
        labels = [f"c{c}@{s}" for c, s in data["columns"]]
        picked = pick is not None and pick.get("layer") in layers and pick.get("column") in labels
        if picked:
            pick = {"row": layers.index(pick["layer"]), "col": labels.index(pick["column"])}
        z = overlap_with(data, pick["row"], pick["col"]) if picked else data["shared"]
        custom = [[[r, c, data["columns"][c][1]] for c in range(len(labels))] for r in range(len(layers))]
        text = [[" ".join(map(str, cell[:4])) + (" …" if len(cell) > 4 else "") for cell in row]
                for row in data["cells"]]
        fig = go.Figure(go.Heatmap(z=z, x=labels, y=layers, colorscale="Purples", customdata=custom, text=text,
                                   hovertemplate="%{y} × %{x}<br>filters: %{text}<br>" +
                                                 ("shared with the pinned cell" if picked else
                                                  "shared with other cells") + ": %{z}<extra></extra>",
                                   colorbar={"title": {"text": "shared"}}))
        detail = ""
        if picked:
            r, c = pick["row"], pick["col"]
            fig.add_trace(go.Scatter(x=[labels[c]], y=[layers[r]], mode="markers", hoverinfo="skip",
                                     marker={"symbol": "square-open", "size": 26, "color": "#ef6c00",
                                             "line": {"width": 3}}, showlegend=False))
            chosen = set(data["cells"][r][c])
            others = [f"{labels[j]}: {sorted(chosen & set(cell))}" for j, cell in enumerate(data["cells"][r])
                      if j != c and chosen & set(cell)]
            step = data["columns"][c][1]
            per_layer = "\n".join(f"  {layer}: {ids}" for layer, ids in data["top"][step].items())
            detail = (f"pinned: {layers[r]} × {labels[c]} — top-{data['k']} changed filters "
                      f"{data['cells'][r][c]}\nshared with: " + ("; ".join(others) or "none") +
                      f"\ntop-{data['k']} changed filters of every layer at step {step} (most changed first):\n"
                      + per_layer)
        fig.update_layout(title={"text": f"top-{data['k']} changed filters per layer and flagged class (click a "
                                         f"cell to pin)", "font": {"size": 12}},
                          xaxis={"type": "category", "title": "flagged class @ step"},
                          yaxis={"type": "category", "autorange": "reversed"},
                          margin={"l": 140, "r": 10, "t": 40, "b": 60})
        return fig, detail
