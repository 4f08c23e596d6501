"""The network view: the layers and their filters as a graph (nodes shake in proportion to their mean squared
gradient: the jitter runs in the browser), a node's or layer's details and images, and the structural commands
(freeze, remove, widen, insert or remove a layer) on the selection.

Zooming (a box drawn on the graph) draws the density strips in view filter by filter (viewmodels/network.py,
``zoomed_layers``); a double-click goes back to the whole network. The zoom is kept per column layout
(``layout_token``): expanding or collapsing a group, or another run, starts from the whole network again."""

from __future__ import annotations

import json
import time

from dash import ClientsideFunction, Input, Output, State, ctx, dcc, html, no_update

from ..figures.network import NODES_UID, network_figure
from ..compute.embeddings import missing_maps_reason
from ..compute.layers import default_expanded, expandable_groups, group_ancestors
from ..viewmodels.images import activation_image, data_uri, filter_image, fit_rows, to_uint8
from ..viewmodels.network import finite_safe_mean, jitter_pixels, network_model
from .common import bound, button, img, number, steering_controls


def layout() -> html.Div:
    return html.Div([
        html.Div([
            html.Div([
                button("Expand all", "btn-expand-all"), button("Collapse all", "btn-collapse-all"),
                button("Default grouping", "btn-default-grouping"), button("Whole network", "btn-zoom-out"),
                html.Span(" Click a node for its details and actions; click a ▸ group to open it; draw a box to zoom "
                          "(strips in view drawn filter by filter), double-click or \"Whole network\" to zoom out. "
                          "Nodes shake in proportion to their mean squared gradient; paths: top 50% by activation; "
                          "❄ = frozen.",
                          style={"color": "#666", "fontSize": "12px"}),
            ]),
            # a model of many columns draws wider than the view (columns stay readable): the view scrolls. A
            # zoomed figure holds its zoom's ranges, so Plotly's "reset" would keep them: a double-click autoranges
            # (network_zoom reads that as zoomed out)
            html.Div(dcc.Graph(id="net-graph", style={"height": "600px"},
                               config={"displayModeBar": False, "doubleClick": "autosize"}, clear_on_unhover=True), style={"overflowX": "auto"}),
        ], style={"flex": "3", "minWidth": "0"}),
        html.Div([
            html.H4("Details", style={"margin": "4px 0"}),
            dcc.Dropdown(id="net-layer", placeholder="layer", clearable=False),
            html.Div(id="net-details", style={"fontSize": "13px", "overflowWrap": "anywhere"}),
            html.Div([html.Div("filter (weights)", style={"fontSize": "11px"}), img("net-filter-img"),
                      html.Div("activation map (probe image)", style={"fontSize": "11px"}),
                      dcc.Dropdown(id="net-probe", value=0, clearable=False, style={"width": "160px"}),
                      img("net-act-img")]),
            html.Hr(),
            steering_controls("steer-network", [
                html.Div([button("Freeze filter", "btn-freeze-filter"), button("Unfreeze filter",
                                                                               "btn-unfreeze-filter"),
                          button("Remove filter", "btn-remove-filter")]),
                html.Div([button("Freeze layer", "btn-freeze-layer"), button("Unfreeze layer",
                                                                             "btn-unfreeze-layer")]),
                html.Div([number("widen-k", "k", step=1, width="60px"), button("Add filter(s)", "btn-widen")]),
                html.Div([button("Insert layer after", "btn-insert-layer"),
                          dcc.Checklist(id="insert-bn", options=[{"label": " with BatchNorm", "value": "bn"}],
                                        value=[], inline=True, style={"display": "inline-block"}),
                          button("Remove layer", "btn-remove-layer")]),
            ]),
            html.Div(id="net-feedback", style={"color": "#555", "fontSize": "13px", "marginTop": "4px"}),
        ], style={"flex": "1", "minWidth": "280px", "padding": "6px", "borderLeft": "1px solid #ddd"}),
    ], style={"display": "flex", "gap": "8px"})


def register(app, hub) -> None:
    app.callback(Output("net-graph", "figure"), Output("net-anim", "data"), Output("net-sig", "data"),
                 Output("net-layer", "options"),
                 Input("tick-network", "data"), Input("net-expanded", "data"), Input("run-select", "value"),
                 Input("net-zoom", "data"), State("tabs", "value"), State("net-sig", "data"))(bound(network_view, hub))
    app.callback(Output("net-zoom", "data"), Input("net-graph", "relayoutData"), Input("btn-zoom-out", "n_clicks"),
                 State("net-zoom", "data"),
                 State("net-expanded", "data"), State("run-select", "value"), prevent_initial_call=True)(network_zoom)
    app.clientside_callback(ClientsideFunction("revacnn", "jitter"), Output("net-anim-out", "data"),
                            Input("net-anim", "data"))
    app.callback(Output("net-expanded", "data"), Output("net-selected", "data"), Output("net-layer", "value"),
                 Input("net-graph", "clickData"), Input("btn-expand-all", "n_clicks"),
                 Input("btn-collapse-all", "n_clicks"), Input("btn-default-grouping", "n_clicks"),
                 Input("net-layer", "value"),
                 State("net-expanded", "data"), State("run-select", "value"), State("net-selected", "data"),
                 prevent_initial_call=True)(bound(network_click, hub))
    app.callback(Output("net-details", "children"), Output("net-filter-img", "src"), Output("net-act-img", "src"),
                 Output("net-probe", "options"), Output("net-probe", "value"),
                 Input("net-selected", "data"), Input("tick-network", "data"), Input("net-probe", "value"),
                 State("run-select", "value"), State("tabs", "value"))(bound(network_details, hub))
    app.callback(Output("net-feedback", "children"),
                 Input("btn-freeze-filter", "n_clicks"), Input("btn-unfreeze-filter", "n_clicks"),
                 Input("btn-remove-filter", "n_clicks"), Input("btn-freeze-layer", "n_clicks"),
                 Input("btn-unfreeze-layer", "n_clicks"), Input("btn-widen", "n_clicks"),
                 Input("btn-insert-layer", "n_clicks"), Input("btn-remove-layer", "n_clicks"),
                 Input("run-select", "value"), State("net-selected", "data"), State("widen-k", "value"),
                 State("insert-bn", "value"), prevent_initial_call=True)(bound(network_commands, hub))


def layout_token(expanded, key) -> str:
    """Names the network's column layout (the run, the groups expanded): the figure's ``uirevision`` (Plotly keeps
    the user's zoom while it stays the same) and the zoom's stamp (a zoom of another layout is not applied)."""
    ids = expanded.get("ids") if expanded and expanded.get("key") == key else None
    return json.dumps([key, ids])


def network_zoom(relayout, _out, zoom, expanded, key):
    """The view's zoom from the graph's relayout event: ``{"token", "x", "y"}`` (a range the event does not name
    stays as it was), None when zoomed back out ("Whole network", or a double-click: autorange or the full ranges,
    which the view model reads as no zoom)."""
    if ctx.triggered_id == "btn-zoom-out":
        return None
    if not relayout:
        return no_update
    token = layout_token(expanded, key)
    mine = dict(zoom) if zoom and zoom.get("token") == token else {"token": token}
    if relayout.get("xaxis.autorange") and relayout.get("yaxis.autorange"):
        return None
    changed = False
    for axis in ("x", "y"):
        if relayout.get(f"{axis}axis.autorange"):
            mine.pop(axis, None)
            changed = True
        elif f"{axis}axis.range[0]" in relayout and f"{axis}axis.range[1]" in relayout:
            mine[axis] = [float(relayout[f"{axis}axis.range[0]"]), float(relayout[f"{axis}axis.range[1]"])]
            changed = True
        elif isinstance(relayout.get(f"{axis}axis.range"), list) and len(relayout[f"{axis}axis.range"]) == 2:
            mine[axis] = [float(v) for v in relayout[f"{axis}axis.range"]]
            changed = True
    return mine if changed else no_update


def network_view(hub, _n, expanded, key, zoom, tab, sig):
    state = hub.get(key)
    if state is None or state.structure is None or tab != "network":
        return no_update, no_update, no_update, no_update
    structure = state.structure
    latest = state.latest_filters()
    names = [l["name"] for l in structure["layers"]]
    if expanded is None or expanded.get("key") != key:
        exp, opened = default_expanded(names), {}
    else:
        exp, opened = expanded["ids"], expanded.get("open") or {}
    token = layout_token(expanded, key)
    zoom = zoom if zoom and zoom.get("token") == token else None
    new_sig = [key, state.generation, structure.get("revision"), latest[0] if latest else None, exp, opened,
               [l.get("frozen") for l in structure["layers"]], [l["out"] for l in structure["layers"]], zoom]
    if new_sig == sig:
        return no_update, no_update, no_update, no_update
    fields = state.filters_by_layer()
    model = network_model(structure, fields, exp, opened=opened, zoom=zoom)
    fig, _ = network_figure(model, uirevision=token)
    anim = {"uid": NODES_UID, "amp": jitter_pixels([n["jitter"] for n in model["nodes"]]),
            "t": time.time()}
    options = [{"label": f"{l['name']} ({l['type']}, {l['out']} out)", "value": l["name"]}
               for l in structure["layers"]]
    return fig, anim, new_sig, options


def layer_description(layer: dict) -> str:
    """``Conv2d 64→256, kernel 1, 16,384 params, frozen: no``, leaving out what the structure does not say."""
    parts = [f"{layer.get('type', 'layer')} "
             + (f"{layer['in']}→{layer['out']}" if layer.get("in") is not None else f"{layer.get('out')} filters")]
    if layer.get("kernel") is not None:
        parts.append(f"kernel {layer['kernel']}")
    if isinstance(layer.get("params"), int):
        parts.append(f"{layer['params']:,} params")
    parts.append(f"frozen: {layer.get('frozen') or 'no'}")
    return ", ".join(parts)


def network_click(hub, click, _a, _b, _c, layer_value, expanded, key, selected):
    state = hub.get(key)
    if state is None or state.structure is None:
        return no_update, no_update, no_update
    names = [l["name"] for l in state.structure["layers"]]
    mine = expanded and expanded.get("key") == key
    exp = expanded["ids"] if mine else default_expanded(names)
    opened = dict(expanded.get("open") or {}) if mine else {}
    trigger = ctx.triggered_id
    if trigger == "btn-expand-all":
        return {"key": key, "ids": expandable_groups(names)}, no_update, no_update
    if trigger == "btn-collapse-all":
        return {"key": key, "ids": [""]}, no_update, no_update
    if trigger == "btn-default-grouping":
        return {"key": key, "ids": default_expanded(names)}, no_update, no_update
    if trigger == "net-layer":
        if selected and selected.get("layer") == layer_value:
            return no_update, no_update, no_update
        return no_update, {"layer": layer_value, "filters": None}, no_update
    if not click or not click.get("points"):
        return no_update, no_update, no_update
    cd = click_target(click["points"][0].get("customdata"))
    if not cd:
        return no_update, no_update, no_update
    layer, start, count, group = cd[:4]
    action = cd[4] if len(cd) > 4 else ""
    new_exp = no_update
    if group:
        new_exp = {"key": key, "ids": sorted(set(exp) | group_ancestors(group)), "open": opened}
    if action == "close":
        opened.pop(layer, None)
        return {"key": key, "ids": exp, "open": opened}, {"layer": layer, "filters": None}, layer
    if action == "open":    # a cell of a density strip: the layer opened on the cell's filters, those selected
        opened[layer] = [int(start), int(start) + int(count)]
        new_exp = {"key": key, "ids": exp, "open": opened}
    if layer:
        sel = {"layer": layer, "filters": list(range(int(start), int(start) + int(count))) if count else None}
        return new_exp, sel, layer
    return new_exp, no_update, no_update


def click_target(custom) -> list | None:
    """What a clicked point names: a node's custom data ``[layer, first filter, count, group, action]``, or a strip
    cell's, which the figure gives as that list in JSON (figures/network.py, ``_strip_trace``); None for anything
    else."""
    if isinstance(custom, str):
        try:
            custom = json.loads(custom)
        except ValueError:
            return None
    return custom if isinstance(custom, list) and len(custom) >= 4 else None


def network_details(hub, selected, _n, probe, key, tab):
    state = hub.get(key)
    if state is None or tab != "network" and ctx.triggered_id == "tick-network":
        return no_update, no_update, no_update, no_update, no_update
    if not selected or not selected.get("layer") or state.structure is None:
        return html.Div("click a node or pick a layer", style={"color": "#777"}), "", "", [], no_update
    name = selected["layer"]
    layer = next((l for l in state.structure["layers"] if l["name"] == name), None)
    if layer is None:
        return html.Div(f"{name} is no longer in the model"), "", "", [], no_update
    filters = selected.get("filters")
    fields = state.filters_by_layer().get(name, {})
    lines = [html.Div([html.B(name), f" — {layer_description(layer)}"])]
    ratio = state.layer_ratio.get(name)
    if ratio is not None:
        lines.append(html.Div(f"layer ‖g‖/‖w‖ = {ratio:.3g}"))
    sel = filters if filters else list(range(int(layer["out"])))
    if fields and sel:
        rows = []
        for f, arr in fields.items():
            vals = arr[[i for i in sel if i < len(arr)]]
            rows.append(html.Tr([html.Td(f), html.Td(f"{finite_safe_mean(vals):.4g}" if len(vals) else "–")]))
        lines.append(html.Div(f"filter {sel[0]}" if filters and len(filters) == 1 else
                              f"{'filters ' + str(sel[0]) + '–' + str(sel[-1]) if filters else 'layer mean'}"))
        lines.append(html.Table(rows, className="net-stats"))
    snap = state.snapshot
    filt_src = act_src = ""
    probes, shown = [], no_update
    if snap is not None:
        i = sel[0] if sel else 0   # a layer of no filter: no image
        filt_src = filter_src(snap.arrays.get("weight/" + name), i)
        a = snap.arrays.get("act/" + name)
        if a is not None:
            classes = snap.body.get("probe_labels") or []  # empty where the labels are not class indices
            probes = [{"label": f"#{p} (label {classes[p]})" if p < len(classes) else f"#{p}", "value": p}
                      for p in range(len(a))]
            p = shown = int(probe or 0) if int(probe or 0) < len(a) else 0
            act_src = activation_src(a, p, i)
        missing = missing_maps_reason(snap.body, snap.arrays, name)
        lines.append(html.Div(f"snapshot at step {snap.body.get('step')}" + (f" · {missing}" if missing else ""),
                              style={"color": "#777"}))
    # The value goes out with the options: the dropdown drops a value its options (empty until a layer is
    # picked) do not hold, and showed an empty box over probe image 0's map.
    return lines, filt_src, act_src, probes, shown


def filter_src(w, i: int) -> str:
    """Filter ``i`` of the weights ``w`` as an image (a data URI), "" when there is none."""
    if w is None or i >= len(w):
        return ""
    image = filter_image(w[i])
    return (data_uri(image, scale=max(1, min(96 // w.shape[-1], 300 // image.shape[1])))
            if w.ndim >= 4 else data_uri(fit_rows(image, width=300)))


def activation_src(a, p: int, i: int) -> str:
    """Filter ``i``'s activation for probe image ``p`` as an image (a data URI), "" when there is none."""
    if a.ndim == 4 and i < a.shape[1]:
        return data_uri(to_uint8(a[p, i]), scale=max(1, 96 // a.shape[-1]))
    if a.ndim > 4 and i < a.shape[1]:  # a 3-D conv: the filter's depth slices in a row
        image = activation_image(a[p, i][None])
        return data_uri(image, scale=max(1, min(96 // a.shape[-1], 300 // image.shape[1])))
    if a.ndim == 2:  # a Linear: one value per filter
        return data_uri(fit_rows(to_uint8(a[p][None, :]), width=300))
    if a.ndim == 3 and i < a.shape[1]:  # a Conv1d, or a Linear on tokens: the filter's sequence
        return data_uri(fit_rows(to_uint8(a[p, i][None, :]), width=300))
    return ""


def network_commands(hub, *args):
    key, selected, k, bn = args[8:]
    state = hub.get(key)
    trigger = ctx.triggered_id
    if trigger == "run-select":
        return ""
    if state is None or not trigger:
        return no_update
    if not selected or not selected.get("layer"):
        return "select a layer or filter first (click a node)"
    layer = selected["layer"]
    filters = selected.get("filters")
    if trigger in ("btn-freeze-filter", "btn-unfreeze-filter", "btn-remove-filter") and not filters:
        return "select a filter first (click a filter node)"
    op, cargs = {
        "btn-freeze-filter": ("freeze", {"layer": layer, "filters": filters}),
        "btn-unfreeze-filter": ("unfreeze", {"layer": layer, "filters": filters}),
        "btn-remove-filter": ("remove_filters", {"layer": layer, "filters": filters}),
        "btn-freeze-layer": ("freeze", {"layers": [layer]}),
        "btn-unfreeze-layer": ("unfreeze", {"layers": [layer]}),
        "btn-widen": ("widen", {"layer": layer, "count": int(k or 1)}),
        "btn-insert-layer": ("insert_layer", {"after": layer, "batchnorm": "bn" in (bn or [])}),
        "btn-remove-layer": ("remove_layer", {"layer": layer}),
    }[trigger]
    state.submit(op, cargs)
    return f"sent {op} {cargs} — see the event log for the ack"
