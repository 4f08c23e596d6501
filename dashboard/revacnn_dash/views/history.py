"""Undo and rewind from the dashboard: an Undo button on every applied command of the event log (a ``rewind`` to the
restore point taken before that command: it and everything after it are taken back), and "rewind to here" on the
training chart (a ``rewind`` to the latest restore point at or before the clicked step). Both go through the event
log like every command: pending → queued → done | error. docs/protocol.md, "Undo and rewind"."""

from __future__ import annotations

import time

from dash import ALL, Input, Output, State, ctx, dcc, html, no_update

from .common import bound, button

UNDO_BUTTON = "undo-command"


def rewind_controls() -> html.Span:
    """The chart's "rewind to here": armed by a click on the chart (inside the training view's steering controls,
    so disabled with them while the run cannot take commands)."""
    return html.Span([button("Rewind to here (click a step on the chart first)", "btn-rewind", disabled=True),
                      dcc.Store(id="rewind-step")])


def undo_button(event: dict) -> html.Button | str:
    """The event log's Undo for an applied command that left a restore point."""
    point = event.get("restore_point")
    if event.get("status") != "done" or not isinstance(point, int):
        return ""
    return html.Button("Undo", id={"type": UNDO_BUTTON, "point": point}, n_clicks=0, className="rv-btn ev-undo",
                       title="go back to just before this command (it and every later change are taken back)",
                       style={"marginLeft": "6px", "fontSize": "11px"})


def layout() -> html.Span:
    return html.Span(id="history-feedback", style={"marginLeft": "6px", "color": "#555"})


def register(app, hub) -> None:
    app.callback(Output("btn-rewind", "children"), Output("btn-rewind", "disabled"), Output("rewind-step", "data"),
                 Input("train-graph", "clickData"), prevent_initial_call=True)(chosen_step)
    app.callback(Output("history-feedback", "children"), Input("btn-rewind", "n_clicks"),
                 Input({"type": UNDO_BUTTON, "point": ALL}, "n_clicks"), State("rewind-step", "data"),
                 State("run-select", "value"), prevent_initial_call=True)(bound(go_back, hub))


def chosen_step(click):
    points = (click or {}).get("points") or []
    step = points[0].get("x") if points else None
    if not isinstance(step, (int, float)):
        return no_update, no_update, no_update
    return f"Rewind to step {int(step)}", False, int(step)


def go_back(hub, rewind_clicks, undo_clicks, step, key):
    state = hub.get(key)
    trigger = ctx.triggered_id
    if state is None or not trigger or not (ctx.triggered[0].get("value") or 0):
        return no_update   # an Undo button drawn anew with the event log (n_clicks 0), not a click
    if trigger == "btn-rewind":
        if not isinstance(step, int):
            return no_update
        args = {"step": step}
    else:
        args = {"point": int(trigger["point"])}
    state.submit("rewind", args)
    return f"sent rewind {args} at {time.strftime('%H:%M:%S')} — see the event log for the ack"
