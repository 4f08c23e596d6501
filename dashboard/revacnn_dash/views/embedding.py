"""The embedding view: a layer's filters placed by PCA, t-SNE or UMAP (computed on the hub's worker thread and cached
per snapshot), a hovered filter's image, and drag steering: a point dropped elsewhere re-initialises that filter
from its new nearest neighbours (the drag runs in the browser: assets/revacnn.js, ``drag``)."""

from __future__ import annotations

import time

import numpy as np
import plotly.graph_objects as go
from dash import ClientsideFunction, Input, Output, State, dcc, html, no_update

from ..figures.embedding import embedding_figure
from ..figures.network import NO_LAYER
from ..compute.embeddings import missing_maps_reason, nearest_neighbours
from ..viewmodels.images import data_uri, filter_image
from .common import bound, img, monitors_no_layer


def layout() -> html.Div:
    return html.Div([
        html.Div([
            dcc.Dropdown(id="emb-layer", placeholder="layer", clearable=False, style={"width": "180px"}),
            dcc.RadioItems(id="emb-source", value="weight", inline=True, options=[
                {"label": " filter coefficients ", "value": "weight"}, {"label": " filter gradients ", "value":
                                                                         "grad"},
                {"label": " activation maps ", "value": "act"}, {"label": " activation gradients ",
                                                                 "value": "actgrad"}]),
            dcc.RadioItems(id="emb-method", value="pca", inline=True, options=[
                {"label": " PCA ", "value": "pca"}, {"label": " t-SNE ", "value": "tsne"},
                {"label": " UMAP ", "value": "umap"}]),
            dcc.RadioItems(id="emb-colour", value="grad", inline=True, options=[
                {"label": " colour: |gradient| ", "value": "grad"}, {"label": " colour: cluster ",
                                                                     "value": "cluster"}]),
            html.Span("probe:"), dcc.Dropdown(id="emb-probe", value=0, clearable=False, style={"width": "80px"}),
        ], style={"display": "flex", "gap": "10px", "alignItems": "center", "flexWrap": "wrap"}),
        html.Div(id="emb-status", style={"color": "#555", "fontSize": "12px"}),
        html.Div([
            dcc.Graph(id="emb-graph", style={"height": "540px", "flex": "3"}, config={"displayModeBar": False}),
            html.Div([html.Div("hover a point: its filter", style={"fontSize": "12px"}), img("emb-hover-img",
                                                                                            width="160px"),
                      html.Div(id="emb-hover-text", style={"fontSize": "12px"}),
                      html.Hr(),
                      html.Div("Drag a point to re-initialise that filter from its 4 new nearest "
                               "neighbours (inverse-distance weighted).", style={"fontSize": "12px"}),
                      html.Div(id="emb-feedback", style={"fontSize": "13px", "color": "#555"})],
                     style={"flex": "1", "padding": "6px"}),
        ], style={"display": "flex"}),
        dcc.Store(id="emb-data"), dcc.Store(id="emb-drop"), dcc.Store(id="emb-drag-installed"),
    ])


def register(app, hub) -> None:
    app.callback(Output("emb-graph", "figure"), Output("emb-status", "children"), Output("emb-data", "data"),
                 Input("tick-embedding", "data"), Input("emb-layer", "value"), Input("emb-source", "value"),
                 Input("emb-method", "value"), Input("emb-colour", "value"), Input("emb-probe", "value"),
                 State("tabs", "value"), State("run-select", "value"),
                 State("emb-data", "data"))(bound(embedding_view, hub))
    app.callback(Output("emb-hover-img", "src"), Output("emb-hover-text", "children"),
                 Input("emb-graph", "hoverData"), State("emb-data", "data"),
                 State("run-select", "value"))(bound(embedding_hover, hub))
    app.clientside_callback(ClientsideFunction("revacnn", "drag"), Output("emb-drag-installed", "data"),
                            Input("emb-data", "data"))
    app.callback(Output("emb-feedback", "children"), Input("emb-drop", "data"),
                 State("emb-data", "data"), State("run-select", "value"),
                 prevent_initial_call=True)(bound(embedding_drag, hub))


#: When the page first asked for each embedding still being computed (the status counts the seconds); bounded.
_WAITING: dict[str, float] = {}


def _waiting_since(job: str) -> float:
    if job not in _WAITING:
        while len(_WAITING) >= 64:
            _WAITING.pop(next(iter(_WAITING)))
        _WAITING[job] = time.monotonic()
    return _WAITING[job]


def embedding_view(hub, _n, layer, source, method, colour, probe, tab, key, current):
    state = hub.get(key)
    umap_text = hub.embeddings.umap_status()
    if tab != "embedding":
        return no_update, no_update, no_update
    if state is not None and monitors_no_layer(state):
        return go.Figure(), NO_LAYER, None
    if state is None or layer is None or state.snapshot is None:
        return no_update, f"waiting for a snapshot · {umap_text}", no_update
    snap = state.snapshot
    snap_key = (state.generation, snap.seq, snap.body.get("step"))
    ids = next((l.get("filter_ids") for l in (state.structure or {}).get("layers", []) if l["name"] == layer),
               None) or []
    probe = int(probe or 0)
    missing = missing_maps_reason(snap.body, snap.arrays, layer) if source in ("act", "actgrad") else None
    if missing:
        return go.Figure(), f"cannot embed: {missing} · {umap_text}", None
    job = [key, list(snap_key), layer, source, method, probe, colour]
    result = hub.embeddings.request(key, snap_key, snap.arrays, ids, layer, source, method, probe, colour)
    if result is None:
        waited = time.monotonic() - _waiting_since(repr(job))
        return no_update, html.Span([html.Span(className="rv-spinner"),
                                     f"computing {method.upper()} of {layer} ({source}) at step "
                                     f"{snap.body.get('step')}… {waited:.0f} s (off the page's thread: the other "
                                     f"views keep updating) · {umap_text}"]), no_update
    _WAITING.pop(repr(job), None)
    if "error" in result:
        return go.Figure(), f"cannot embed: {result['error']} · {umap_text}", None
    if current and current.get("job") == job:
        return no_update, no_update, no_update
    fig = embedding_figure(result, colour, layer, source, method, snap.body.get("step"))
    status = (f"{method.upper()} of {result['n']} filters of {layer} ({source}) at step {snap.body.get('step')}"
              f" in {result['seconds']:.2f} s{' · aligned to the previous layout' if result['aligned'] else ''}"
              f" · {umap_text}")
    if result.get("not_finite"):  # a diverged run: its points collapse onto the zeros they are drawn as
        status += f" · ⚠ {result['not_finite']} of {result['n']} filters hold NaN or inf, embedded as zeros"
    return fig, status, {"job": job, "coords": result["coords"], "layer": layer}


def embedding_hover(hub, hover, data, key):
    state = hub.get(key)
    if not hover or not data or state is None or state.snapshot is None:
        return "", ""
    i = int(hover["points"][0].get("pointIndex", hover["points"][0].get("pointNumber", 0)))
    w = state.snapshot.arrays.get("weight/" + data["layer"])
    if w is None or i >= len(w):
        return "", ""
    return data_uri(filter_image(w[i]), scale=max(1, 120 // max(w.shape[-1], 1)) if w.ndim == 4 else 2), \
        f"{data['layer']} filter {i}"


def embedding_drag(hub, drop, data, key):
    state = hub.get(key)
    if not drop or not data or state is None:
        return no_update
    idx = int(drop["index"])
    point = (float(drop["x"]), float(drop["y"]))
    coords = np.array(data["coords"], dtype=float)
    neighbours, distances = nearest_neighbours(coords, point, exclude=idx, k=4)
    state.submit("reinit_filters", {"layer": data["layer"], "filters": [idx], "mode": "neighbours",
                                    "neighbours": neighbours, "distances": distances})
    return f"re-initialise {data['layer']} filter {idx} from filters {neighbours} — see the event log"
