"""Several runs compared: the loss curves of the runs the user picks (live or recorded, any of the hub's), drawn
over each other under the training chart, each named by its module class, start time and id."""

from __future__ import annotations

import numpy as np
from dash import Input, Output, State, dcc, html, no_update

from ..figures.run_overlay import overlay_figure
from .common import bound


def layout() -> html.Details:
    return html.Details([
        html.Summary("Compare runs: overlay their loss"),
        html.Div([
            dcc.Dropdown(id="overlay-runs", multi=True, placeholder="runs to overlay", style={"minWidth": "480px"}),
            dcc.Checklist(id="overlay-log", options=[{"label": " log scale", "value": "log"}], value=[],
                          inline=True),
        ], style={"display": "flex", "gap": "12px", "alignItems": "center"}),
        dcc.Graph(id="overlay-graph", style={"height": "360px"}, config={"displayModeBar": False}),
        dcc.Store(id="overlay-sig"),
    ], id="overlay", style={"marginTop": "6px"})


def register(app, hub) -> None:
    app.callback(Output("overlay-runs", "options"), Input("tick-training", "data"),
                 State("overlay-runs", "options"))(bound(overlay_options, hub))
    app.callback(Output("overlay-graph", "figure"), Output("overlay-sig", "data"),
                 Input("tick-training", "data"), Input("overlay-runs", "value"), Input("overlay-log", "value"),
                 State("overlay-sig", "data"))(bound(overlay_view, hub))


def overlay_options(hub, _n, shown):
    options = hub.options()
    return no_update if options == shown else options


def overlay_view(hub, _n, keys, log, sig):
    states = [s for s in (hub.get(k) for k in keys or []) if s is not None]
    new_sig = [[s.key, s.generation, s.scalars.total] for s in states] + [bool(log)]
    if new_sig == sig:
        return no_update, no_update
    names = {o["value"]: o["label"] for o in hub.options()}
    curves = []
    for s in states:
        cols, _, _ = s.scalars_since(0)
        curves.append((names.get(s.key, s.key), np.asarray(cols.get("step", [])), np.asarray(cols.get("loss", []))))
    return overlay_figure(curves, log_y=bool(log)), new_sig
