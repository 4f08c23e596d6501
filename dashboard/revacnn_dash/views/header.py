"""The header: which run is shown (a live run or a recording, and a recording's snapshot step), its connection
banner and one-line summary; it also locks the steering controls while the shown run cannot take commands."""

from __future__ import annotations

import math
from typing import Any

import dash_mantine_components as dmc
import numpy as np
from dash import Input, Output, State, dcc, html, no_update

from ..data.replay import load_replay
from .common import STEERING_CONTROLS, bound

STATUS_COLOURS = {"live": "#2e7d32", "connecting": "#f9a825", "unreachable": "#c62828", "finished": "#455a64",
                  "incompatible": "#6a1b9a", "replay": "#1565c0"}


def layout() -> list:
    return [
        html.Div([
            html.Span("revacnn", className="rv-brand"),
            dcc.Dropdown(id="run-select", clearable=False, style={"width": "520px"}),
            dcc.Dropdown(id="replay-step", placeholder="snapshot step", clearable=False,
                         style={"width": "160px", "display": "none"}),
            html.Div(id="conn-banner", style={"marginLeft": "12px", "fontWeight": "bold"}),
            dmc.Switch(id="theme-dark", label="dark", size="sm", checked=False, persistence=True,
                       persistence_type="local", style={"marginLeft": "auto"}),
        ], className="rv-header"),
        html.Div(id="run-summary", style={"fontSize": "13px", "color": "#495057", "margin": "0 0 4px"}),
    ]


def register(app, hub) -> None:
    app.callback(Output("run-select", "options"), Output("run-select", "value"), Output("conn-banner", "children"),
                 Output("conn-banner", "style"), Output("run-summary", "children"),
                 Output("replay-step", "options"), Output("replay-step", "style"), Output("replay-step", "value"),
                 *[Output(id_, prop) for id_ in STEERING_CONTROLS for prop in ("disabled", "title")],
                 Input("tick", "n_intervals"), State("run-select", "value"), State("run-select", "options"),
                 State("replay-step", "value"), State("replay-step", "options"), State("replay-step", "style"),
                 State(STEERING_CONTROLS[0], "title"))(bound(header, hub))
    app.callback(Output("replay-step", "className"), Input("replay-step", "value"), State("run-select", "value"),
                 prevent_initial_call=True)(bound(replay_step, hub))


def header(hub, _n, shown_key, shown_options, replay_value, replay_options, replay_style, shown_lock):
    # Outputs that did not change are not sent: a new run-select value would fire every view that takes it.
    def changed(new, shown):
        return no_update if new == shown else new

    def steering_lock(reason: str) -> list:  # the fieldsets always change together: one of them tells
        if reason == (shown_lock or ""):
            return [no_update] * (2 * len(STEERING_CONTROLS))
        return [bool(reason), reason] * len(STEERING_CONTROLS)

    options = hub.options()
    key = shown_key if shown_key in {o["value"] for o in options} else (options[0]["value"] if options else None)
    state = hub.get(key)
    if state is None:
        return changed(options, shown_options), changed(key, shown_key), "no runs: pass --connect or --logdir", \
            {"color": "#c62828"}, "", changed([], replay_options), changed({"display": "none"}, replay_style), \
            changed(None, replay_value), *steering_lock("no run to steer")
    s = state.summary()
    banner = banner_children(s)
    style = {"marginLeft": "12px", "fontWeight": "bold", "color": STATUS_COLOURS.get(s["conn"], "#000")}
    steps = getattr(state, "replay_steps", None)
    step_opts, step_style, step_value = [], {"display": "none"}, None
    if state.source == "replay" and steps:
        step_opts = [{"label": f"step {st}", "value": st} for st in steps]
        step_style = {"width": "160px"}
        step_value = replay_value if replay_value in steps else getattr(state, "replay_step", steps[-1])
    return changed(options, shown_options), changed(key, shown_key), banner, style, summary_line(s), \
        changed(step_opts, replay_options), changed(step_style, replay_style), changed(step_value, replay_value), \
        *steering_lock(steering_unavailable(s))


def summary_line(s: dict[str, Any]) -> str:
    """The line under the header: run (the user's name for it, then its id), state, step, epoch, latest loss and
    throughput, dropped messages."""
    last = s["last"]
    run = f"run {s['name']} ({s['run_id'] or '?'})" if s.get("name") else f"run {s['run_id'] or '?'}"
    parts = [run, f"state {s['state'] or '?'}", f"step {s['step']}", f"epoch {s['epoch']}"]
    if resumed := resumed_text(s.get("resumed")):
        parts.insert(1, resumed)
    if last.get("loss") is not None:
        parts.append(f"loss {last['loss']:.4f}")
    if last.get("samples_per_s") is not None and np.isfinite(last["samples_per_s"]):
        parts.append(f"{last['samples_per_s']:.0f} samples/s")
    if s["gaps"]:
        parts.append(f"{s['gaps']} telemetry messages dropped")
    return " · ".join(parts)


def replay_step(hub, step, key):
    """Another snapshot step of a recording picked: the run state is refilled as of that step."""
    state = hub.get(key)
    reader = hub.replays.get(key)
    if state is None or reader is None or step is None or step == getattr(state, "replay_step", None):
        return no_update
    load_replay(state, reader, step=int(step))
    return "loaded"


def steering_unavailable(summary: dict[str, Any]) -> str:
    """Why the shown run cannot be steered now, or "" when it can (only a live run takes commands)."""
    if summary["conn"] == "replay":
        return "a recorded run cannot be steered: connect to the trainer (--connect) to steer it"
    if summary["conn"] != "live":
        return f"the run is {summary['conn']}: steering is available while it is live"
    return ""


def resumed_text(resumed: Any) -> str:
    """"continues run X from step N" for a run resumed from a checkpoint (the heartbeat's ``resumed``), else ""."""
    if not isinstance(resumed, dict) or not isinstance(resumed.get("step"), int):
        return ""
    earlier = f"run {resumed['run']}" if isinstance(resumed.get("run"), str) else "a checkpoint"
    return f"continues {earlier} from step {resumed['step']}"


def loss_not_finite_text(since: int) -> str:
    """The banner's warning on a diverged run (the wire says the loss was not finite, not whether NaN or inf)."""
    return f"⚠ loss is NaN or ±inf since step {since} (diverged?)"


def divergence_text(d: dict[str, Any]) -> str:
    """The divergence guard's latest event (``status.divergence``, docs/protocol.md "Undo and rewind")."""
    done = {"rewind": f"rewound to restore point {d.get('restore_point')}", "pause": "paused", "warn": "warned"}
    loss = d.get("loss")
    return (f"⚠ divergence at step {d.get('step')}: {d.get('reason')}"
            + (f" (loss {loss:.3g})" if isinstance(loss, (int, float)) else "")
            + f" — {done.get(d.get('action'), d.get('action'))}")


def banner_children(s: dict[str, Any]) -> list:
    """The run banner: connection state and message verbatim (e.g. a refused CURVE key), a 🔒 CURVE badge when
    the run's heartbeat says CURVE is on, and the recorder's or the telemetry's error when either stopped."""
    children: list = [f"{s['conn'].upper()} — {s['conn_message']}"]
    security = s.get("security") if isinstance(s.get("security"), dict) else {}
    if security.get("mode") == "curve":
        counts = ", ".join(f"{k} {security[k]}" for k in ("allowed", "accepted", "denied") if k in security)
        children.append(html.Span("🔒 CURVE", id="security-badge", title=f"CURVE-encrypted and authenticated "
                                  f"({counts} client keys)" if counts else "CURVE-encrypted and authenticated",
                                  style={"marginLeft": "10px", "padding": "1px 6px", "borderRadius": "4px",
                                         "background": "#e8f5e9", "color": "#1b5e20", "fontWeight": "normal"}))
    if s.get("loss_not_finite_since") is not None:
        children.append(html.Span(loss_not_finite_text(s["loss_not_finite_since"]),
                                  id="loss-not-finite", style={"marginLeft": "10px", "color": "#c62828",
                                                               "fontWeight": "normal"}))
    if isinstance(s.get("divergence"), dict):
        children.append(html.Span(divergence_text(s["divergence"]), id="divergence",
                                  style={"marginLeft": "10px", "color": "#c62828", "fontWeight": "normal"}))
    if s.get("recording_error"):
        children.append(html.Span(f"⚠ recording stopped: {s['recording_error']}", id="recording-error",
                                  style={"marginLeft": "10px", "color": "#c62828", "fontWeight": "normal"}))
    if s.get("telemetry_error"):
        children.append(html.Span(f"⚠ telemetry stopped (internal error): {s['telemetry_error']}",
                                  id="telemetry-error", style={"marginLeft": "10px", "color": "#c62828",
                                                               "fontWeight": "normal"}))
    schedule = schedule_text(s.get("schedule"))
    if schedule:
        children.append(html.Span(schedule[0], id="telemetry-schedule", title=schedule[1],
                                  style={"marginLeft": "10px", "color": "#555", "fontWeight": "normal"}))
    return children


def _cadence(every: Any, what: str) -> str:
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        return ""
    if every == 0:
        return f"{what} off"
    return f"{what} every step" if every == 1 else f"{what} every {every:,} steps"


def schedule_text(schedule: Any) -> tuple[str, str] | None:
    """The heartbeat's telemetry schedule as a banner line ("per-filter data every 50 steps · snapshots every 2,000
    · telemetry 1.6 % of training") and its tooltip (the budget and each quantity's measured cost); None without
    one. Any value a run could send is shown or left out, never an error."""
    if not isinstance(schedule, dict):
        return None
    parts = [text for text in (_cadence(schedule.get("filters_every"), "per-filter data"),
                               _cadence(schedule.get("snapshot_every"), "snapshots")) if text]
    cost = schedule.get("cost")
    if isinstance(cost, (int, float)) and not isinstance(cost, bool) and math.isfinite(cost) and cost > 0:
        parts.append(f"telemetry {100 * cost:.1f} % of training")
    if not parts:
        return None
    budget = schedule.get("budget")
    tip = [f"budget: {100 * budget:g} % of training time" if isinstance(budget, (int, float))
           and not isinstance(budget, bool) and math.isfinite(budget) else "no budget: the cadences are fixed"]
    fixed = schedule.get("fixed")
    if isinstance(fixed, list) and fixed:
        tip.append("fixed by the user: " + ", ".join(map(str, fixed)))
    seconds = schedule.get("seconds")
    if isinstance(seconds, dict):
        tip += [f"{name}: {1000 * value:.1f} ms each" for name, value in seconds.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    return " · ".join(parts), "\n".join(tip)
