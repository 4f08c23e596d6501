"""The training view: loss, accuracy and learning-rate chart (grown with ``Patch``: only new points travel), the
hyper-parameters in force, and the commands that change them or pause, resume, stop and snapshot the run."""

from __future__ import annotations

import time

import plotly.graph_objects as go
from dash import Input, Output, Patch, State, ctx, dcc, html, no_update
from revacnn.wire.acks import DONE
from revacnn.wire.ops import SET_BATCH_SIZE, SET_HPARAMS

from ..figures.training import finite_list, has_accuracy, lr_axis, lr_values, markers, smoothed, training_figure
from . import history
from .common import bound, button, number, steering_controls


def layout() -> html.Div:
    return html.Div([
        html.Div([
            dcc.Checklist(id="train-log", options=[{"label": " log-scale loss", "value": "log"}], value=[],
                          inline=True),
            html.Span("smoothing", title="exponential moving average of the train loss, as TensorBoard's",
                      style={"marginLeft": "16px"}),
            html.Div(dcc.Slider(id="train-smooth", min=0, max=0.99, step=0.01, value=0.6, marks={0: "0", 0.99: "0.99"},
                                tooltip={"placement": "bottom"}), style={"width": "220px"}),
        ], style={"display": "flex", "alignItems": "center", "gap": "6px", "fontSize": "13px"}),
        dcc.Graph(id="train-graph", style={"height": "560px"}, config={"displayModeBar": False}),
        html.Div([
            html.Div([html.B("Hyper-parameters "), html.Span(id="hp-now", style={"color": "#555"})]),
            steering_controls("steer-training", [
                html.Div([
                    number("in-lr", "lr"), button("Set lr", "btn-lr"),
                    number("in-momentum", "momentum"), button("Set momentum", "btn-momentum"),
                    number("in-wd", "weight decay"), button("Set weight decay", "btn-wd"),
                    number("in-bs", "batch size", step=1), button("Set batch size", "btn-bs"),
                ]),
                html.Div([button("Pause", "btn-pause"), button("Resume", "btn-resume"),
                          button("Stop", "btn-stop"), button("Snapshot", "btn-snapshot"),
                          history.rewind_controls()]),
            ]),
            html.Span(id="train-feedback", style={"marginLeft": "4px", "color": "#555"}),
        ], className="rv-card"),
    ])


def register(app, hub) -> None:
    app.callback(Output("train-graph", "figure"), Output("train-cursor", "data"), Output("hp-now", "children"),
                 Input("tick-training", "data"), Input("run-select", "value"), Input("train-log", "value"),
                 Input("train-smooth", "value"), State("train-cursor", "data"),
                 State("tabs", "value"))(bound(training_chart, hub))
    app.callback(Output("train-feedback", "children"),
                 Input("btn-lr", "n_clicks"), Input("btn-momentum", "n_clicks"), Input("btn-wd", "n_clicks"),
                 Input("btn-bs", "n_clicks"), Input("btn-pause", "n_clicks"), Input("btn-resume", "n_clicks"),
                 Input("btn-stop", "n_clicks"), Input("btn-snapshot", "n_clicks"), Input("run-select", "value"),
                 State("in-lr", "value"), State("in-momentum", "value"), State("in-wd", "value"),
                 State("in-bs", "value"), prevent_initial_call=True)(bound(training_commands, hub))


def hparams_text(hp: dict | None) -> str:
    if not hp:
        return "(waiting for hparams)"
    groups = hp.get("groups") or [{}]
    return (f"lr {groups[0].get('lr')}, momentum {groups[0].get('momentum')}, weight decay "
            f"{groups[0].get('weight_decay')}, batch size {hp.get('batch_size')}, optimizer {hp.get('optimizer')}")


def training_chart(hub, _n, key, log_scale, smoothing, cursor, tab):
    state = hub.get(key)
    if state is None:
        return go.Figure(), None, ""
    hp_text = hparams_text(state.hparams)
    if tab != "training" and cursor and cursor.get("key") == key:
        return no_update, no_update, hp_text
    # markers for the commands applied by this trainer process (a restarted one starts a new step axis)
    events = [e for e in state.event_list() if e["status"] == DONE and e["step"] is not None
              and e["generation"] == state.generation]
    summary = state.summary()
    events += divergence_markers(summary.get("divergence"))
    branches = summary["branches"]
    val = state.val_history()
    marker_sig = [e["id"] for e in events]
    merged = state.history_revision   # read before the steps: a merge after them redraws at the next tick
    view = [bool(log_scale), float(smoothing or 0.0)]      # the loss axis and smoothing asked for
    full = (not cursor or cursor.get("key") != key or cursor.get("gen") != state.generation
            or cursor.get("history") != merged      # older steps merged in front: redraw
            or cursor.get("view") != view
            or cursor.get("branches", 1) != len(branches))   # an undo or rewind: the chart is drawn anew
    if not full:
        cols, start, total = state.scalars_since(cursor["count"])
        # Redrawn from the ring when it wrapped past what the browser has, and when the browser's chart has
        # grown to 1.5 rings: the page then holds at most that many points however long the run.
        full = (start > cursor["count"] or total - cursor.get("first", 0) > state.scalars.capacity * 3 // 2
                or state.history_revision != merged)   # older steps merged in meanwhile: the ring was rebuilt
    if full:
        cols, start, total = state.scalars_since(0)
        fig = training_figure(cols, val, events, log_loss=view[0], smoothing=view[1], branches=branches)
        return fig, {"key": key, "gen": state.generation, "history": merged, "view": view, "count": total,
                     "branches": len(branches),
                     "first": start, "ema": smoothed(cols["loss"], view[1])[1], "lr": lr_values(cols["lr"]),
                     "markers": marker_sig, "val": len(val), "acc": has_accuracy(cols, val)}, hp_text
    cursor = dict(cursor)
    patch, has_acc = chart_patch(cursor, cols, total, val, events, marker_sig)
    return patch, {**cursor, "count": total, "markers": marker_sig, "val": len(val), "acc": has_acc}, hp_text


def divergence_markers(divergence) -> list[dict]:
    """A chart marker for the divergence guard's latest event (the heartbeat's ``divergence``)."""
    if not isinstance(divergence, dict) or not isinstance(divergence.get("step"), int):
        return []
    return [{"id": f"divergence-{divergence.get('count')}", "step": divergence["step"],
             "label": f"⚠ divergence ({divergence.get('action')})"}]


def chart_patch(cursor: dict, cols: dict, total: int, val: list, events: list, marker_sig: list) -> tuple[Patch, bool]:
    """What the browser's chart lacks: the new points, the validations and markers when they changed (the
    cursor's smoothing carry moves on with the points)."""
    patch = Patch()
    has_acc = cursor.get("acc") or has_accuracy(cols, val)
    if has_acc and not cursor.get("acc"):  # the first accuracy: the panel gets its title and autorange back
        patch["layout"]["yaxis2"]["title"]["text"] = "accuracy"
        patch["layout"]["yaxis2"]["autorange"] = True
    if total > cursor["count"]:
        x = finite_list(cols["step"])
        for trace, name in ((0, "loss"), (2, "train_acc"), (4, "lr")):
            patch["data"][trace]["x"].extend(x)
            patch["data"][trace]["y"].extend(finite_list(cols[name]))
        rates = lr_values(cols["lr"], cursor.get("lr") or [])
        if rates != cursor.get("lr"):      # a new learning rate: its own tick
            for name, value in lr_axis(rates).items():
                patch["layout"]["yaxis3"][name] = value
            cursor["lr"] = rates
        smoothing = cursor["view"][1]
        if smoothing > 0:      # the smoothed loss goes on from where the browser's ends
            ema, cursor["ema"] = smoothed(cols["loss"], smoothing, tuple(cursor["ema"]))
            patch["data"][5]["x"].extend(x)
            patch["data"][5]["y"].extend(ema)
    if len(val) != cursor.get("val"):
        patch["data"][1]["x"] = [v["step"] for v in val]
        patch["data"][1]["y"] = [v["val_loss"] for v in val]
        patch["data"][3]["x"] = [v["step"] for v in val]
        patch["data"][3]["y"] = [v["val_acc"] for v in val]
    if marker_sig != cursor.get("markers"):
        shapes, notes = markers(events)
        patch["layout"]["shapes"] = shapes
        patch["layout"]["annotations"] = notes
    return patch, has_acc


def training_commands(hub, *args):
    key, lr, momentum, wd, bs = args[8:]
    state = hub.get(key)
    trigger = ctx.triggered_id
    if trigger == "run-select":
        return ""       # the feedback was about the run shown before
    if state is None or not trigger:
        return no_update
    values = {"btn-lr": (SET_HPARAMS, "lr", lr), "btn-momentum": (SET_HPARAMS, "momentum", momentum),
              "btn-wd": (SET_HPARAMS, "weight_decay", wd), "btn-bs": (SET_BATCH_SIZE, "batch_size", bs)}
    if trigger in values:
        op, field, value = values[trigger]
        if value is None:
            return f"enter a value for {field} first"
        args_ = {field: int(value) if field == "batch_size" else float(value)}
    else:
        op, args_ = trigger.removeprefix("btn-"), {}
    state.submit(op, args_)
    return f"sent {op} {args_ or ''} at {time.strftime('%H:%M:%S')}"
