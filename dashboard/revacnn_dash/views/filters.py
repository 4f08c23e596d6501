"""The filters view: a layer's filters, activation and activation-gradient maps for a probe image, and redundancy
hints (near-duplicate, dead, converged filters) with their remove, re-initialise and freeze actions."""

from __future__ import annotations

import numpy as np
from dash import ALL, Input, Output, State, ctx, dcc, html, no_update

from ..figures.network import NO_LAYER
from ..figures.tables import hints_table
from ..compute.embeddings import missing_maps_reason
from ..compute.redundancy import redundancy
from ..viewmodels.images import activation_image, data_uri, filter_image, fit_rows, to_uint8
from ..viewmodels.labelled import labelled_grid
from .common import bound, img, monitors_no_layer, steering_controls


def layout() -> html.Div:
    return html.Div([
        html.Div([dcc.Dropdown(id="fil-layer", placeholder="layer", clearable=False, style={"width": "200px"}),
                  html.Span("probe image:"), dcc.Dropdown(id="fil-probe", value=0, clearable=False,
                                                          style={"width": "80px"}),
                  img("fil-probe-img", height="48px")],
                 style={"display": "flex", "gap": "10px", "alignItems": "center"}),
        html.Div(id="fil-caption", style={"fontSize": "12px", "color": "#555"}),
        html.Div([
            html.Div([html.B("filters"), html.Br(), img("fil-weights")], style={"flex": "1"}),
            html.Div([html.B("activation maps"), html.Br(), img("fil-acts"), html.Br(),
                      html.B("activation-gradient maps"), html.Br(), img("fil-actgrads")], style={"flex": "1"}),
        ], style={"display": "flex", "gap": "12px"}),
        html.H4("Redundancy hints"),
        steering_controls("steer-filters", [html.Div(id="fil-hints")]),
        html.Div(id="fil-feedback", style={"fontSize": "13px", "color": "#555"}),
    ])


def register(app, hub) -> None:
    app.callback(Output("fil-weights", "src"), Output("fil-acts", "src"), Output("fil-actgrads", "src"),
                 Output("fil-probe-img", "src"), Output("fil-caption", "children"), Output("fil-hints", "children"),
                 Output("fil-sig", "data"),
                 Input("tick-filters", "data"), Input("fil-layer", "value"), Input("fil-probe", "value"),
                 State("tabs", "value"), State("run-select", "value"),
                 State("fil-sig", "data"))(bound(filters_view, hub))
    app.callback(Output("fil-feedback", "children"), Input({"type": "hint", "op": ALL, "layer": ALL,
                                                            "filters": ALL}, "n_clicks"),
                 State("run-select", "value"), prevent_initial_call=True)(bound(hint_action, hub))


def filters_view(hub, _n, layer, probe, tab, key, sig):
    state = hub.get(key)
    if tab == "filters" and state is not None and monitors_no_layer(state):
        return "", "", "", "", NO_LAYER, "", sig
    if tab != "filters" or state is None or layer is None:
        return (no_update,) * 7
    snap = state.snapshot
    latest = state.latest_filters()
    structure = state.structure or {}
    new_sig = [key, state.generation, snap.seq if snap else None, latest[0] if latest else None, layer, probe,
               structure.get("revision"), [l.get("frozen") for l in structure.get("layers", [])]]
    if new_sig == sig:
        return (no_update,) * 7
    if snap is None:
        return "", "", "", "", "waiting for a snapshot", "", new_sig
    w = snap.arrays.get("weight/" + layer)
    weights, caption = weight_images(w)
    caption = f"snapshot at step {snap.body.get('step')}" + caption
    p = int(probe or 0)
    acts, actgrads, maps_caption = map_images(snap.arrays, layer, p)
    caption += maps_caption
    missing = missing_maps_reason(snap.body, snap.arrays, layer)
    if missing:
        caption += f" · {missing}"
    probe_img = ""
    images = snap.arrays.get("probe_images")
    if images is not None and p < len(images):
        image = images[p]
        probe_img = data_uri(to_uint8(np.transpose(image, (1, 2, 0)) if image.shape[0] == 3 else image[0]), scale=2)
    hints = layer_hints(state, structure, layer, w)
    return weights, acts, actgrads, probe_img, caption, hints_table(layer, hints), new_sig


def weight_images(w: np.ndarray | None) -> tuple[str, str]:
    """A layer's weights as one image (a data URI), each filter's index drawn with it, and what the caption says
    of its layout."""
    if w is None:
        return "", ""
    if w.ndim == 4 and w.shape[1] == 3:
        tiles = [filter_image(f, rgb=True) for f in w]
        return (data_uri(labelled_grid(tiles, ncols=8, tile_labels=[str(i) for i in range(len(w))])),
                f" · {len(w)} filters as RGB images (colour = the 3 input channels), index over each")
    if w.ndim == 4:
        cin = min(w.shape[1], 32)
        tiles = [to_uint8(f[c], symmetric=True) for f in w for c in range(cin)]
        return (data_uri(labelled_grid(tiles, ncols=cin, row_labels=[str(i) for i in range(len(w))],
                                       col_labels=[str(c) for c in range(cin)])),
                f" · {len(w)} filters (rows, index at the left) × {cin} input channels (columns, index on top)"
                + (f" of {w.shape[1]}" if w.shape[1] > cin else "") + "; grey = 0")
    if w.ndim > 4:  # a 3-D conv: per filter, the depth slices of each input channel
        slices = w.reshape(len(w), -1, *w.shape[-2:])[:, :32]
        tiles = [to_uint8(s, symmetric=True) for f in slices for s in f]
        return (data_uri(labelled_grid(tiles, ncols=slices.shape[1], row_labels=[str(i) for i in range(len(w))],
                                       col_labels=[str(c) for c in range(slices.shape[1])])),
                f" · {len(w)} filters (rows, index at the left) × {slices.shape[1]} slices (columns: the "
                f"{w.shape[2]} depth slices of each input channel); grey = 0")
    return (data_uri(fit_rows(to_uint8(w.reshape(len(w), -1), symmetric=True))),
            f" · weight matrix {tuple(w.shape)}, a row per filter")


MAP_COLUMNS = 8        # conv activation maps per row
MAX_MAPS = 256         # more maps than this (a 2,048-channel layer) would make a page metres tall


def map_images(arrays: dict, layer: str, p: int) -> tuple[str, str, str]:
    """The layer's activation and activation-gradient maps for probe image ``p`` (data URIs, "" when absent), and
    what the caption says of their layout."""
    out = {"act/": "", "actgrad/": ""}
    caption = ""
    for name in out:
        a = arrays.get(name + layer)
        if a is None or p >= len(a):
            continue
        if a.ndim >= 4:
            image, caption = map_grid(a[p], symmetric=name == "actgrad/")
            out[name] = data_uri(image)
        else:
            out[name] = data_uri(fit_rows(activation_image(a[p], symmetric=name == "actgrad/")))
    return out["act/"], out["actgrad/"], caption


def map_grid(maps: np.ndarray, symmetric: bool) -> tuple[np.ndarray, str]:
    """A conv's maps ``[C, H, W]`` as a grid of enlarged tiles, ``MAP_COLUMNS`` to a row, each filter's index over
    its map (row and column labels would repeat those indices); a 3-D conv's ``[C, D, H, W]`` as a row of depth
    slices per filter, filters down the left and slices along the top. Each map is scaled on its own (grey = 0
    when signed)."""
    shown = maps[:MAX_MAPS]
    more = f" (the first {MAX_MAPS} of {len(maps)})" if len(maps) > MAX_MAPS else ""
    if maps.ndim == 3:
        tiles = [to_uint8(m, symmetric=symmetric) for m in shown]
        grid = labelled_grid(tiles, ncols=MAP_COLUMNS, tile_labels=[str(i) for i in range(len(tiles))])
        return grid, f" · maps: {len(shown)} filters{more}, {MAP_COLUMNS} a row, index over each"
    slices = shown.reshape(len(shown), -1, *maps.shape[-2:])
    tiles = [to_uint8(s, symmetric=symmetric) for f in slices for s in f]
    grid = labelled_grid(tiles, ncols=slices.shape[1], row_labels=[str(i) for i in range(len(shown))],
                         col_labels=[str(d) for d in range(slices.shape[1])])
    return grid, f" · maps: {len(shown)} filters{more} (rows) × {slices.shape[1]} depth slices (columns)"


def layer_hints(state, structure: dict, layer: str, w: np.ndarray | None) -> dict[str, list]:
    """The redundancy hints of ``layer``, its frozen filters left out."""
    layer_info = next((l for l in structure.get("layers", []) if l["name"] == layer), {})
    frozen = np.zeros(int(layer_info.get("out", 0) or 0), dtype=bool)
    if layer_info.get("frozen") == "all":
        frozen[:] = True
    elif isinstance(layer_info.get("frozen"), list):
        frozen[[i for i in layer_info["frozen"] if i < len(frozen)]] = True
    fields = state.filters_by_layer().get(layer)
    ww = w if w is not None and len(w) == len(frozen) else None
    return redundancy(ww, fields, frozen if len(frozen) else None)


def hint_action(hub, clicks, key):
    trigger = ctx.triggered_id
    state = hub.get(key)
    if not trigger or state is None or not any(c for c in clicks if c):
        return no_update
    if not ctx.triggered or not ctx.triggered[0].get("value"):
        return no_update
    filters = [int(i) for i in str(trigger["filters"]).split(",")]
    op = trigger["op"]
    layer = trigger["layer"]
    if op == "remove":
        state.submit("remove_filters", {"layer": layer, "filters": filters})
    elif op == "reinit":
        state.submit("reinit_filters", {"layer": layer, "filters": filters, "mode": "random"})
    else:
        state.submit("freeze", {"layer": layer, "filters": filters})
    return f"sent {op} of {layer} filters {filters} — see the event log"
