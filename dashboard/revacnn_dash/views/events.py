"""The event log under the tabs: the shown run's steering commands, newest first, with their acks."""

from __future__ import annotations

from dash import Input, Output, State, html, no_update

from ..figures.tables import event_table
from . import history
from .common import bound


def layout() -> list:
    return [html.H4(["Event log (steering commands)", history.layout()], style={"marginBottom": "2px"}),
            html.Div(id="event-log", style={"maxHeight": "220px", "overflowY": "auto", "fontSize": "13px"})]


def register(app, hub) -> None:
    app.callback(Output("event-log", "children"), Output("event-sig", "data"), Input("tick", "n_intervals"),
                 Input("run-select", "value"), State("event-sig", "data"))(bound(event_log, hub))


def event_log(hub, _n, key, sig):
    state = hub.get(key)
    if state is None:
        return "", None
    events = state.event_list()[::-1][:100]
    new_sig = [key, [[e[name] for name in ("id", "status", "step", "label", "error", "note", "restore_point")]
                     for e in events]]
    if new_sig == sig:
        return no_update, no_update      # the table is as shown: nothing to send or redraw
    return event_table(events, history.undo_button), new_sig
