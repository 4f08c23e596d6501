"""The training-log explorer (DeepTracker): a layer tree, small multiples of a layer statistic per node, a layer's
filters × iterations, validation images × iterations, and the cube (layers × iterations × flagged classes); clicks
pin steps on every time axis. Ids start with ``ane-``.

Given a page tick (the id of a component whose data changes on every refresh while the page is shown), the views
re-read a run still being recorded, at most every ``LIVE_REFRESH_S`` and only when it got data.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import ALL, Input, Output, State, ctx, dcc, html, no_update

from ..analysis.explorer import CHART_FIELDS, build_tree, filter_chart, layer_overview, steering_events
from ..analysis.tracking import anomalies, cube, cube_cells
from ..data.recordings import RunSource
from ..figures.explorer_charts import cube_figure, filter_chart_figure, multiples_figure, validation_figures
from .common import bound

OVERVIEW_FIELDS = ("grad_weight_ratio", "update_ratio", "grad_sq_mean", "grad_abs_mean", "weight_norm",
                   "act_abs_mean")


def layout(source: RunSource) -> html.Div:
    """The training-log explorer page."""
    options = source.options()
    return html.Div(id="ane-page", children=[
        html.H3("Training-log explorer"),
        html.Div([dcc.Dropdown(id="ane-run", options=options, value=options[0]["value"] if options else None,
                               clearable=False,
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
        html.H4("Cube: layers × iterations × flagged classes"),
        html.Div([html.Span("class slice "),
                  dcc.Dropdown(id="ane-cube-class", value="any", clearable=False, style={"width": "220px"},
                               options=[{"label": "any flagged class", "value": "any"}])],
                 style={"display": "flex", "gap": "8px", "alignItems": "center"}),
        dcc.Graph(id="ane-cube", style={"height": "360px"}),
        html.Div(id="ane-cube-detail", style={"fontSize": "13px", "whiteSpace": "pre-wrap"}),
    ])


def register(app, source: RunSource, page_tick: str | None = None) -> None:
    if page_tick is not None:
        app.callback(Output("ane-live", "data"), Output("ane-run", "options"), Input(page_tick, "data"),
                     State("ane-run", "value"), State("ane-live", "data"),
                     prevent_initial_call=True)(bound(follow_explorer, source))
    app.callback(Output("ane-node", "data"), Input("ane-run", "value"),
                 Input({"type": "ane-node", "node": ALL}, "n_clicks"),
                 State("ane-node", "data"))(bound(focus_node, source))
    app.callback(Output("ane-tree", "children"), Output("ane-crumbs", "children"), Input("ane-node", "data"),
                 Input("ane-live", "data"), State("ane-run", "value"))(bound(tree_view, source))
    app.callback(Output("ane-pins", "data"), Input("ane-multiples", "clickData"),
                 Input("ane-filter-chart", "clickData"), Input("ane-heatlines", "clickData"),
                 Input("ane-cube-pick", "data"), Input("ane-clear-pins", "n_clicks"), State("ane-pins", "data"),
                 prevent_initial_call=True)(pin_steps)
    app.callback(Output("ane-xrange", "data"), Input("ane-multiples", "relayoutData"),
                 Input("ane-filter-chart", "relayoutData"), Input("ane-reset-zoom", "n_clicks"),
                 Input("ane-run", "value"), prevent_initial_call=True)(zoom)
    app.callback(Output("ane-multiples", "figure"), Output("ane-leaf", "style"),
                 Input("ane-node", "data"), Input("ane-field", "value"), Input("ane-pins", "data"),
                 Input("ane-xrange", "data"), Input("ane-live", "data"),
                 State("ane-run", "value"))(bound(multiples_view, source))
    app.callback(Output("ane-filter-chart", "figure"), Input("ane-node", "data"),
                 Input("ane-chart-field", "value"), Input("ane-order", "value"), Input("ane-pins", "data"),
                 Input("ane-xrange", "data"), Input("ane-live", "data"),
                 State("ane-run", "value"))(bound(chart_view, source))
    app.callback(Output("ane-heatlines", "figure"), Output("ane-images", "figure"),
                 Output("ane-val-summary", "children"),
                 Input("ane-run", "value"), Input("ane-window", "value"), Input("ane-threshold", "value"),
                 Input("ane-direction", "value"), Input("ane-class", "value"), Input("ane-pins", "data"),
                 Input("ane-live", "data"))(bound(validation, source))
    app.callback(Output("ane-cube-pick", "data"), Input("ane-cube", "clickData"), State("ane-cube-pick", "data"),
                 prevent_initial_call=True)(pick_cell)
    app.callback(Output("ane-cube", "figure"), Output("ane-cube-detail", "children"),
                 Output("ane-cube-class", "options"), Input("ane-run", "value"),
                 Input("ane-window", "value"), Input("ane-threshold", "value"), Input("ane-direction", "value"),
                 Input("ane-k", "value"), Input("ane-cube-class", "value"), Input("ane-cube-pick", "data"),
                 Input("ane-live", "data"))(bound(cube_view, source))


def follow_explorer(source: RunSource, _tick, run, live):
    marker = source.follow([run], live)
    return (no_update, no_update) if marker is None else (marker, source.options())


def tree_of(source: RunSource, run):
    return source.cached(("tree", run, source.version(run)), lambda: build_tree(source.reader(run).layer_names()))


def focus_in(tree, focus):
    """``focus`` if the tree (re-read from a live run: a layer may have been removed) still has it, else its root."""
    return focus if focus in tree["nodes"] else tree["root"]


def bounds(xrange):
    if not xrange:
        return None, None
    return int(np.floor(float(xrange[0]))), int(np.ceil(float(xrange[1]))) + 1


def val_info(source: RunSource, run, window, threshold, direction):
    return source.cached(("val", run, source.version(run), window, threshold, direction),
                         lambda: anomalies(source.reader(run).val_predictions(), int(window or 3),
                                           int(threshold or 5), direction or "backward"))


def focus_node(source: RunSource, run, clicks, current):
    if ctx.triggered_id == "ane-run" or not run:
        return tree_of(source, run)["root"] if run else None
    if isinstance(ctx.triggered_id, dict) and any(clicks or []):
        return ctx.triggered_id["node"]
    return current or (tree_of(source, run)["root"] if run else None)


def tree_view(source: RunSource, focus, _live, run):
    if not run or focus is None:
        return [], ""
    tree = tree_of(source, run)
    focus = focus_in(tree, focus)
    crumbs, node = [], focus
    while node is not None:
        crumbs.insert(0, tree["nodes"][node]["name"])
        node = tree["nodes"][node]["parent"]
    return tree_children(tree, tree["root"], focus), " → ".join(crumbs)


def tree_children(tree: dict, node_id: str, focus: str | None) -> html.Div:
    node = tree["nodes"][node_id]
    style = {"fontWeight": "bold" if node_id == focus else "normal", "border": "none", "background": "none",
             "cursor": "pointer", "padding": "1px 2px", "textAlign": "left",
             "color": "#0d47a1" if node["layer"] else "#333"}
    button = html.Button(node["name"], id={"type": "ane-node", "node": node_id}, style=style, n_clicks=0)
    kids = [tree_children(tree, c, focus) for c in node["children"]]
    return html.Div([button] + ([html.Div(kids, style={"paddingLeft": "12px"})] if kids else []))


def pin_steps(c1, c2, c3, pick, clear, pins):
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


def zoom(r1, r2, reset, run):
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


def multiples_view(source: RunSource, focus, field, pins, xrange, _live, run):
    if not run or focus is None:
        return go.Figure(), {"display": "none"}
    reader = source.reader(run)
    tree = tree_of(source, run)
    focus = focus_in(tree, focus)
    start, stop = bounds(xrange)
    overview = layer_overview(reader, tree, start, stop, resolution=400, field=field)
    leaf = tree["nodes"][focus]["layer"] is not None
    return (multiples_figure(overview, tree, focus, pins, steering_events(reader), xrange),
            {"display": "block"} if leaf else {"display": "none"})


def chart_view(source: RunSource, focus, field, order, pins, xrange, _live, run):
    if not run or focus is None:
        return go.Figure()
    tree = tree_of(source, run)
    layer = tree["nodes"][focus_in(tree, focus)]["layer"]
    if layer is None:
        return go.Figure()
    reader = source.reader(run)
    start, stop = bounds(xrange)
    chart = filter_chart(reader, layer, field, start, stop, resolution=600, order=order)
    return filter_chart_figure(chart, pins, steering_events(reader), xrange)


def validation(source: RunSource, run, window, threshold, direction, klass, pins, _live):
    if not run:
        return go.Figure(), go.Figure(), ""
    info = val_info(source, run, window, threshold, direction)
    heat, images = validation_figures(info, klass, pins, steering_events(source.reader(run)))
    steps = info["steps"]
    summary = (f"{len(steps)} validation samples × {info['correct'].shape[1]} images; window d={info['window']},"
               f" threshold={info['threshold']}: {len(info['flagged_pairs'])} flagged (class, step) pairs")
    if not info["correct"].shape[1]:
        error = source.reader(run).val_predictions()["error"]
        summary = f"{len(steps)} validation samples, no image predictions" + (f": {error}" if error else "")
    return heat, images, summary


def pick_cell(click, current):
    if not click or not click.get("points"):
        return no_update
    point = click["points"][0]          # Dash passes x and y for heatmaps (not customdata)
    x, y = point.get("x"), point.get("y")
    if x is None or y is None:
        return no_update
    return {"layer": y, "step": int(round(float(x)))}


def cube_view(source: RunSource, run, window, threshold, direction, k, klass, pick, _live):
    if not run:
        return go.Figure(), "", no_update
    info = val_info(source, run, window, threshold, direction)
    reader = source.reader(run)
    layers = reader.layer_names()
    # the top-k sets do not depend on the anomaly rule's settings: read once per run version and k
    cells = source.cached(("cube-cells", run, source.version(run), k),
                          lambda: cube_cells(reader, layers, info["steps"], int(k or 10)))
    data = cube(reader, layers, info, int(k or 10), cells=cells)
    options = [{"label": "any flagged class", "value": "any"}] + [
        {"label": f"class {c}" + (" (flagged)" if data["flagged"][c].any() else ""), "value": c}
        for c in range(info["classes"])]
    figure, detail = cube_figure(data, None if klass in (None, "any") else int(klass), pick)
    return figure, detail, options
