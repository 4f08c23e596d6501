"""The page around the views: the header, the refresh tick and its per-tab ticks, the views' stores, the tabs and
the event log.

One ``dcc.Interval`` drives updates: the header and event log on every tick, a tab's views only while that tab is
shown (the browser passes the tick on: assets/revacnn.js, ``tabTicks``; a hidden tab costs no request).
"""

from __future__ import annotations

import dash_mantine_components as dmc
from dash import ClientsideFunction, Input, Output, dcc, html

from . import compare, embedding, events, explore, filters, header, network, run_overlay, training, watched_run

#: The per-tab ticks, in the order of ``tabTicks``' outputs. "layers" feeds the layer menus of the embedding and
#: filters tabs.
TAB_TICKS = ("training", "network", "embedding", "filters", "layers", "explore", "compare")
#: Mantine's theme: one accent colour, the system font stack, small radii (docs/dashboard.md, "Look").
THEME = {"primaryColor": "indigo", "defaultRadius": "sm",
         "fontFamily": "Inter, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"}


def layout(analysis, interval_ms: int) -> dmc.MantineProvider:
    """The page, inside Mantine's provider (its components, the light or dark colour scheme: ``THEME``)."""
    return dmc.MantineProvider(id="mantine", theme=THEME, forceColorScheme="light", children=html.Div([
        *header.layout(),
        dcc.Interval(id="tick", interval=interval_ms),
        *[dcc.Store(id=f"tick-{name}") for name in TAB_TICKS],
        dcc.Store(id="train-cursor"), dcc.Store(id="net-expanded"), dcc.Store(id="net-sig"), dcc.Store(id="net-zoom"),
        dcc.Store(id="net-selected"), dcc.Store(id="net-anim"), dcc.Store(id="net-anim-out"),
        dcc.Store(id="fil-sig"), dcc.Store(id="event-sig"), *watched_run.layout(),
        dcc.Tabs(id="tabs", value="training", children=[
            dcc.Tab(label="Training", value="training", children=[training.layout(), run_overlay.layout()]),
            dcc.Tab(label="Network", value="network", children=network.layout()),
            dcc.Tab(label="Embedding", value="embedding", children=embedding.layout()),
            dcc.Tab(label="Filters", value="filters", children=filters.layout()),
            dcc.Tab(label="Compare snapshots", value="compare", children=compare.layout(analysis)),
            dcc.Tab(label="Explore log", value="explore", children=explore.layout(analysis)),
        ]),
        *events.layout(),
    ], className="rv-page"))


def register(app) -> None:
    app.clientside_callback(ClientsideFunction("revacnn", "tabTicks"),
                            *[Output(f"tick-{name}", "data") for name in TAB_TICKS],
                            Input("tick", "n_intervals"), Input("tabs", "value"))
    app.clientside_callback(ClientsideFunction("theme", "toggle"), Output("mantine", "forceColorScheme"),
                            Input("theme-dark", "checked"))
