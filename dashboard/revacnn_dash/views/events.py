"""The event log under the tabs: the shown run's steering commands (those of the trainer process connected now),
newest first, with their acks and what each changed."""

from __future__ import annotations

from dash import Input, Output, State, html, no_update

from ..figures.tables import event_table
from ..viewmodels.acks import ack_detail
from . import history
from .common import bound


def layout() -> list:
    return [html.Div([html.Div(["Event log (steering commands)", history.layout()],
                               style={"fontWeight": 600, "marginBottom": "4px"}),
                      html.Div(id="event-log", style={"maxHeight": "220px", "overflowY": "auto",
                                                      "fontSize": "13px"})], className="rv-card")]


def register(app, hub) -> None:
    app.callback(Output("event-log", "children"), Output("event-sig", "data"), Input("tick", "n_intervals"),
                 Input("run-select", "value"), State("event-sig", "data"))(bound(event_log, hub))


def event_log(hub, _n, key, sig):
    state = hub.get(key)
    if state is None:
        return "", None
    structure = state.structure
    events = [{**e, "detail": ack_detail(e, structure)} for e in state.event_list(current_process=True)[::-1][:100]]
    new_sig = [key, [[e[name] for name in ("id", "status", "step", "label", "detail", "restore_point")]
                     for e in events]]
    if new_sig == sig:
        return no_update, no_update      # the table is as shown: nothing to send or redraw
    return event_table(events, history.undo_button), new_sig
