"""The snapshot comparison (CNNComparator): pick run/step A (the reference) and run/step B; the per-layer change,
a layer's histograms and per-filter bars, one filter's weights and activations. Ids start with ``anc-``.

Given a page tick (the id of a component whose data changes on every refresh while the page is shown), the page
follows runs still being recorded: the run and step menus list their new snapshots (``RunSource.follow``).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, ctx, dcc, html, no_update

from ..analysis.compare import compare_snapshots
from ..data.recordings import RunSource
from ..figures.comparison_charts import MEASURES, comparison_network_figure, filter_figure, layer_figures
from .common import bound


def layout(source: RunSource) -> html.Div:
    """The snapshot comparison page: pick run/step A (reference) and run/step B."""
    options = source.options()
    run = options[0]["value"] if options else None
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


def register(app, source: RunSource, page_tick: str | None = None) -> None:
    if page_tick is not None:
        app.callback(Output("anc-live", "data"), Output("anc-run-a", "options"), Output("anc-run-b", "options"),
                     Input(page_tick, "data"), State("anc-run-a", "value"), State("anc-run-b", "value"),
                     State("anc-live", "data"), prevent_initial_call=True)(bound(follow_comparison, source))
    app.callback(Output("anc-step-a", "options"), Output("anc-step-a", "value"), Input("anc-run-a", "value"),
                 Input("anc-live", "data"), State("anc-step-a", "value"))(bound(steps_a, source))
    app.callback(Output("anc-step-b", "options"), Output("anc-step-b", "value"), Input("anc-run-b", "value"),
                 Input("anc-live", "data"), State("anc-step-b", "value"))(bound(steps_b, source))
    app.callback(Output("anc-network", "figure"), Output("anc-layer", "options"), Output("anc-layer", "value"),
                 Output("anc-summary", "children"),
                 Input("anc-run-a", "value"), Input("anc-step-a", "value"), Input("anc-run-b", "value"),
                 Input("anc-step-b", "value"), Input("anc-measure", "value"),
                 State("anc-layer", "value"))(bound(network_view, source))
    app.callback(Output("anc-layer-hist", "figure"), Output("anc-filter-bars", "figure"),
                 Output("anc-filter", "options"), Output("anc-filter", "value"),
                 Input("anc-layer", "value"), Input("anc-filter-bars", "clickData"),
                 State("anc-run-a", "value"), State("anc-step-a", "value"), State("anc-run-b", "value"),
                 State("anc-step-b", "value"), State("anc-filter", "value"))(bound(layer_view, source))
    app.callback(Output("anc-filter-view", "figure"), Output("anc-probe", "max"), Input("anc-filter", "value"),
                 Input("anc-probe", "value"), State("anc-layer", "value"), State("anc-run-a", "value"),
                 State("anc-step-a", "value"), State("anc-run-b", "value"),
                 State("anc-step-b", "value"))(bound(filter_view, source))


def follow_comparison(source: RunSource, _tick, run_a, run_b, live):
    marker = source.follow([run_a, run_b], live)
    if marker is None:
        return no_update, no_update, no_update
    options = source.options()
    return marker, options, options


def comparison(source: RunSource, run_a, step_a, run_b, step_b):
    def make():
        ra, rb = source.reader(run_a), source.reader(run_b)
        return compare_snapshots(ra.snapshot(step_a), rb.snapshot(step_b), ra.structures(), rb.structures())
    return source.cached(("cmp", run_a, step_a, run_b, step_b), make)


def step_menu(source: RunSource, run, current, first: bool):
    """A run's snapshot steps as menu options, and the step to show: ``current`` if the run has it, else its
    first or last. Following a live run, an unchanged step is not sent again: the comparison is not redrawn."""
    steps = source.reader(run).snapshot_steps() if run else []
    value = current if current in steps else (steps[0 if first else -1] if steps else None)
    if ctx.triggered_id == "anc-live" and value == current:
        value = no_update
    return [{"label": str(s), "value": s} for s in steps], value


def steps_a(source: RunSource, run, _live, current):
    return step_menu(source, run, current, first=True)


def steps_b(source: RunSource, run, _live, current):
    return step_menu(source, run, current, first=False)


def network_view(source: RunSource, run_a, step_a, run_b, step_b, measure, layer):
    if None in (run_a, step_a, run_b, step_b):
        return go.Figure(), [], None, "pick two snapshots"
    comp = comparison(source, run_a, step_a, run_b, step_b)
    names = list(comp.layers)
    summary = (f"A = step {step_a}, B = step {step_b}; probe images "
               + ("identical: activations compared" if comp.probes_comparable else
                  "differ: activations not compared"))
    return (comparison_network_figure(comp, measure), [{"label": n, "value": n} for n in names],
            layer if layer in names else (names[0] if names else None), summary)


def layer_view(source: RunSource, layer, click, run_a, step_a, run_b, step_b, current):
    if layer is None or None in (run_a, step_a, run_b, step_b):
        return go.Figure(), go.Figure(), [], None
    comp = comparison(source, run_a, step_a, run_b, step_b)
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
    hist, bars = layer_figures(comp, layer)
    options = [{"label": f"{i}" + ("" if i in lc.kept else (" (new)" if i in lc.new else " (removed)")),
                "value": i} for i in ids]
    return hist, bars, options, value


def filter_view(source: RunSource, filter_id, probe, layer, run_a, step_a, run_b, step_b):
    if filter_id is None or layer is None or None in (run_a, step_a, run_b, step_b):
        return go.Figure(), 7
    comp = comparison(source, run_a, step_a, run_b, step_b)
    pair = comp.filter_pair(layer, int(filter_id))
    act = pair.get("act_b") if pair.get("act_b") is not None else pair.get("act_a")
    return filter_figure(pair, int(probe or 0)), max(0, (len(act) if act is not None else 1) - 1)
