"""The Dash app: training, network, embedding and filters views over the runs of a ``Hub``, and the analysis
views (snapshot comparison, training-log explorer) over its recordings.

Every view reads a ``RunState`` (copies under its lock); none blocks another. The page and its tick are in
``views.page``, each view's layout and callbacks in its module under ``views/``, the figures in ``figures/``, the
client-side code (per-tab ticks, the network's jitter, drag steering) in ``assets/``.
"""

from __future__ import annotations

from pathlib import Path

from dash import Dash

from .data.hub import Hub
from .data.recordings import RunSource
from .views import (compare, embedding, events, explore, filters, header, history, layers, network, page,
                    run_overlay, training, watched_run)

ASSETS = Path(__file__).parent / "assets"


def create_app(hub: Hub, interval_ms: int = 500) -> Dash:
    app = Dash(__name__, title="revacnn", update_title=None, suppress_callback_exceptions=True,
               assets_folder=str(ASSETS))
    analysis = RunSource(hub.recording_dirs())
    # A function, so every page load lists the recordings present then (the analysis pages read them at build time).
    app.layout = lambda: page.layout(analysis, interval_ms)
    page.register(app)
    for view in (header, events, training, run_overlay, network, layers, embedding, filters, history):
        view.register(app, hub)
    explore.register(app, analysis, page_tick="tick-explore")
    compare.register(app, analysis, page_tick="tick-compare")
    watched_run.register(app, hub)
    return app
