"""The Dash app: training, network, embedding and filters views over the runs of a ``Hub``.

Every view reads a ``RunState`` (copies under its lock); none blocks another. A ``dcc.Interval`` (500 ms by default)
drives updates: the header and event log on every tick, a tab's views only while that tab is shown (``TAB_TICK_JS``
passes the tick on in the browser, so a hidden tab costs no request). The training chart grows with ``Patch`` (only
new points travel), the network's jitter runs in the browser (requestAnimationFrame moving the SVG points; no server
round trip per frame), embeddings are computed on a worker thread and cached per snapshot.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import ALL, Dash, Input, Output, Patch, State, ctx, dcc, html, no_update
from plotly.subplots import make_subplots

from .analysis import RunSource, comparison_layout, explorer_layout, register_analysis_callbacks
from .hub import Hub, load_replay
from .state import RunState
from .viewmodel import (activation_image, data_uri, default_expanded, filter_image, fit_rows, jitter_pixels,
                        missing_maps_reason, mosaic, nearest_neighbours, network_model, redundancy, to_uint8)

STATUS_COLOURS = {"live": "#2e7d32", "connecting": "#f9a825", "unreachable": "#c62828", "finished": "#455a64",
                  "incompatible": "#6a1b9a", "replay": "#1565c0"}

NODES_UID = "revacnn-nodes"  # the network figure's node trace, found by the client-side jitter

JITTER_JS = """
function(anim) {
    const R = window.__revacnn || (window.__revacnn = {frames: 0, moved: 0});
    R.anim = anim;
    if (!R.running) {
        R.running = true;
        let last = 0;
        const re = /translate\\(([-0-9.e]+)[ ,]+([-0-9.e]+)\\)/;
        const frame = (t) => {
            requestAnimationFrame(frame);
            if (t - last < 40) { return; }
            last = t;
            const a = R.anim;
            if (!a || !a.amp) { return; }
            const gd = document.getElementById('net-graph');
            if (!gd) { return; }
            // Find the nodes' trace group by uid (d3 binds each group to its calcdata, whose [0].trace is the
            // trace): Plotly draws no group for an empty trace, so a position would shift when a path bucket empties.
            let tr = null;
            for (const el of gd.querySelectorAll('.scatterlayer .trace')) {
                const d = el.__data__;
                if (d && d[0] && d[0].trace && d[0].trace.uid === a.uid) { tr = el; }
            }
            if (!tr) { return; }
            const pts = tr.querySelectorAll('path.point');
            R.frames += 1;
            for (let i = 0; i < pts.length && i < a.amp.length; i++) {
                const el = pts[i];
                const cur = el.getAttribute('transform');
                if (cur !== el._rlast) { el._rbase = cur; }
                const m = re.exec(el._rbase || '');
                const amp = a.amp[i];
                if (!m || !(amp > 0.05)) { continue; }
                const x = parseFloat(m[1]) + (Math.random() * 2 - 1) * amp;
                const y = parseFloat(m[2]) + (Math.random() * 2 - 1) * amp;
                const s = 'translate(' + x.toFixed(2) + ',' + y.toFixed(2) + ')';
                el.setAttribute('transform', s);
                el._rlast = s;
                R.moved += 1;
            }
        };
        requestAnimationFrame(frame);
    }
    return window.dash_clientside.no_update;
}
"""


DRAG_JS = """
function(data) {
    // Drag steering: press on a point of the embedding, drop it elsewhere. Installed once on the document (capture
    // phase, so Plotly's zoom-drag does not start); the drop goes to the server through the 'emb-drop' store.
    if (window.__revacnnDrag) { return window.dash_clientside.no_update; }
    window.__revacnnDrag = {drops: 0};
    let drag = null;
    const graph = () => document.querySelector('#emb-graph .js-plotly-plot');
    const points = (gd) => Array.from(gd.querySelectorAll('.scatterlayer .trace:first-child path.point'));
    document.addEventListener('mousedown', (ev) => {
        const gd = graph();
        if (!gd || !gd.contains(ev.target)) { return; }
        let best = -1, bestD = 12;
        points(gd).forEach((el, i) => {
            const r = el.getBoundingClientRect();
            const d = Math.hypot(ev.clientX - (r.left + r.width / 2), ev.clientY - (r.top + r.height / 2));
            if (d < bestD) { bestD = d; best = i; }
        });
        if (best < 0) { return; }
        const el = points(gd)[best];
        drag = {idx: best, el: el, x0: ev.clientX, y0: ev.clientY, base: el.getAttribute('transform') || ''};
        ev.stopPropagation();
        ev.preventDefault();
    }, true);
    document.addEventListener('mousemove', (ev) => {
        if (!drag) { return; }
        const m = /translate\\(([-0-9.e]+)[ ,]+([-0-9.e]+)\\)/.exec(drag.base);
        if (m) {
            drag.el.setAttribute('transform', 'translate(' + (parseFloat(m[1]) + ev.clientX - drag.x0) + ','
                                 + (parseFloat(m[2]) + ev.clientY - drag.y0) + ')');
        }
        ev.stopPropagation();
    }, true);
    document.addEventListener('mouseup', (ev) => {
        if (!drag) { return; }
        const d = drag;
        drag = null;
        ev.stopPropagation();
        if (Math.hypot(ev.clientX - d.x0, ev.clientY - d.y0) < 4) { return; }
        const gd = graph();
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        const box = gd.getBoundingClientRect();
        const x = xa.p2d(ev.clientX - box.left - xa._offset), y = ya.p2d(ev.clientY - box.top - ya._offset);
        window.__revacnnDrag.drops += 1;
        window.dash_clientside.set_props('emb-drop', {data: {index: d.idx, x: x, y: y, t: Date.now()}});
    }, true);
    return window.dash_clientside.no_update;
}
"""

#: The page's tick, passed on in the browser to the views of the tab shown (and at once to a tab when it is opened);
#: the other tabs' ticks stay put, so their callbacks send no request. "layers" feeds the layer menus of the
#: embedding and filters tabs. Each value carries the time, so opening a tab always counts as a change.
TAB_TICKS = ("training", "network", "embedding", "filters", "layers", "explore", "compare")
TAB_TICK_JS = """
function(n, tab) {
    const stamp = [n, Date.now()];
    const nu = window.dash_clientside.no_update;
    return [tab === 'training' ? stamp : nu, tab === 'network' ? stamp : nu, tab === 'embedding' ? stamp : nu,
            tab === 'filters' ? stamp : nu, (tab === 'embedding' || tab === 'filters') ? stamp : nu,
            tab === 'explore' ? stamp : nu, tab === 'compare' ? stamp : nu];
}
"""


NO_LAYER = ("this run monitors no layer: its module has no Conv2d or Linear layer (or none matched the callback's "
            "layers)")


def _monitors_no_layer(state) -> bool:
    return state.structure is not None and not state.structure.get("layers")


def _button(label: str, id_: str, **style: Any) -> html.Button:
    return html.Button(label, id=id_, n_clicks=0, className="rv-btn", style={"margin": "2px", **style})


STEERING_CONTROLS = ("steer-training", "steer-network", "steer-filters")


def _steering_controls(id_: str, children: list) -> html.Fieldset:
    """A group of steering controls, all disabled at once (a disabled fieldset disables every control in it) while
    the shown run cannot take commands; its tooltip says why."""
    return html.Fieldset(children, id=id_, disabled=False,
                         style={"border": "none", "padding": "0", "margin": "0", "minWidth": "0"})


def steering_unavailable(summary: dict[str, Any]) -> str:
    """Why the shown run cannot be steered now, or "" when it can (only a live run takes commands)."""
    if summary["conn"] == "replay":
        return "a recorded run cannot be steered: connect to the trainer (--connect) to steer it"
    if summary["conn"] != "live":
        return f"the run is {summary['conn']}: steering is available while it is live"
    return ""


def _number(id_: str, placeholder: str, step: Any = "any", width: str = "90px") -> dcc.Input:
    return dcc.Input(id=id_, type="number", placeholder=placeholder, step=step, debounce=False,
                     style={"width": width, "margin": "2px"})


def _img(id_: str, **style: Any) -> html.Img:
    return html.Img(id=id_, style={"imageRendering": "pixelated", "maxWidth": "100%", **style})


def create_app(hub: Hub, interval_ms: int = 500) -> Dash:
    app = Dash(__name__, title="revacnn", update_title=None, suppress_callback_exceptions=True)

    training = html.Div([
        dcc.Graph(id="train-graph", style={"height": "560px"}, config={"displayModeBar": False}),
        html.Div([
            html.Div([html.B("Hyper-parameters "), html.Span(id="hp-now", style={"color": "#555"})]),
            _steering_controls("steer-training", [
                html.Div([
                    _number("in-lr", "lr"), _button("Set lr", "btn-lr"),
                    _number("in-momentum", "momentum"), _button("Set momentum", "btn-momentum"),
                    _number("in-wd", "weight decay"), _button("Set weight decay", "btn-wd"),
                    _number("in-bs", "batch size", step=1), _button("Set batch size", "btn-bs"),
                ]),
                html.Div([_button("Pause", "btn-pause"), _button("Resume", "btn-resume"),
                          _button("Stop", "btn-stop"), _button("Snapshot", "btn-snapshot")]),
            ]),
            html.Span(id="train-feedback", style={"marginLeft": "4px", "color": "#555"}),
        ], style={"padding": "6px", "border": "1px solid #ddd", "borderRadius": "4px"}),
    ])

    network = html.Div([
        html.Div([
            html.Div([
                _button("Expand all", "btn-expand-all"), _button("Collapse all", "btn-collapse-all"),
                _button("Default grouping", "btn-default-grouping"),
                html.Span(" Click a node for its details and actions; click a ▸ group to open it. Nodes shake in "
                          "proportion to their mean squared gradient; paths: top 50% by activation; ❄ = frozen.",
                          style={"color": "#666", "fontSize": "12px"}),
            ]),
            dcc.Graph(id="net-graph", style={"height": "600px"}, config={"displayModeBar": False},
                      clear_on_unhover=True),
        ], style={"flex": "3", "minWidth": "0"}),
        html.Div([
            html.H4("Details", style={"margin": "4px 0"}),
            dcc.Dropdown(id="net-layer", placeholder="layer", clearable=False),
            html.Div(id="net-details", style={"fontSize": "13px"}),
            html.Div([html.Div("filter (weights)", style={"fontSize": "11px"}), _img("net-filter-img"),
                      html.Div("activation map (probe image)", style={"fontSize": "11px"}),
                      dcc.Dropdown(id="net-probe", value=0, clearable=False, style={"width": "160px"}),
                      _img("net-act-img")]),
            html.Hr(),
            _steering_controls("steer-network", [
                html.Div([_button("Freeze filter", "btn-freeze-filter"), _button("Unfreeze filter",
                                                                                 "btn-unfreeze-filter"),
                          _button("Remove filter", "btn-remove-filter")]),
                html.Div([_button("Freeze layer", "btn-freeze-layer"), _button("Unfreeze layer",
                                                                               "btn-unfreeze-layer")]),
                html.Div([_number("widen-k", "k", step=1, width="60px"), _button("Add filter(s)", "btn-widen")]),
                html.Div([_button("Insert layer after", "btn-insert-layer"),
                          dcc.Checklist(id="insert-bn", options=[{"label": " with BatchNorm", "value": "bn"}],
                                        value=[], inline=True, style={"display": "inline-block"}),
                          _button("Remove layer", "btn-remove-layer")]),
            ]),
            html.Div(id="net-feedback", style={"color": "#555", "fontSize": "13px", "marginTop": "4px"}),
        ], style={"flex": "1", "minWidth": "280px", "padding": "6px", "borderLeft": "1px solid #ddd"}),
    ], style={"display": "flex", "gap": "8px"})

    embedding = html.Div([
        html.Div([
            dcc.Dropdown(id="emb-layer", placeholder="layer", clearable=False, style={"width": "180px"}),
            dcc.RadioItems(id="emb-source", value="weight", inline=True, options=[
                {"label": " filter coefficients ", "value": "weight"}, {"label": " filter gradients ", "value":
                                                                         "grad"},
                {"label": " activation maps ", "value": "act"}, {"label": " activation gradients ",
                                                                 "value": "actgrad"}]),
            dcc.RadioItems(id="emb-method", value="pca", inline=True, options=[
                {"label": " PCA ", "value": "pca"}, {"label": " t-SNE ", "value": "tsne"},
                {"label": " UMAP ", "value": "umap"}]),
            dcc.RadioItems(id="emb-colour", value="grad", inline=True, options=[
                {"label": " colour: |gradient| ", "value": "grad"}, {"label": " colour: cluster ",
                                                                     "value": "cluster"}]),
            html.Span("probe:"), dcc.Dropdown(id="emb-probe", value=0, clearable=False, style={"width": "80px"}),
        ], style={"display": "flex", "gap": "10px", "alignItems": "center", "flexWrap": "wrap"}),
        html.Div(id="emb-status", style={"color": "#555", "fontSize": "12px"}),
        html.Div([
            dcc.Graph(id="emb-graph", style={"height": "540px", "flex": "3"}, config={"displayModeBar": False}),
            html.Div([html.Div("hover a point: its filter", style={"fontSize": "12px"}), _img("emb-hover-img",
                                                                                             width="160px"),
                      html.Div(id="emb-hover-text", style={"fontSize": "12px"}),
                      html.Hr(),
                      html.Div("Drag a point to re-initialise that filter from its 4 new nearest "
                               "neighbours (inverse-distance weighted).", style={"fontSize": "12px"}),
                      html.Div(id="emb-feedback", style={"fontSize": "13px", "color": "#555"})],
                     style={"flex": "1", "padding": "6px"}),
        ], style={"display": "flex"}),
        dcc.Store(id="emb-data"), dcc.Store(id="emb-drop"), dcc.Store(id="emb-drag-installed"),
    ])

    filters = html.Div([
        html.Div([dcc.Dropdown(id="fil-layer", placeholder="layer", clearable=False, style={"width": "200px"}),
                  html.Span("probe image:"), dcc.Dropdown(id="fil-probe", value=0, clearable=False,
                                                          style={"width": "80px"}),
                  _img("fil-probe-img", height="48px")],
                 style={"display": "flex", "gap": "10px", "alignItems": "center"}),
        html.Div(id="fil-caption", style={"fontSize": "12px", "color": "#555"}),
        html.Div([
            html.Div([html.B("filters"), html.Br(), _img("fil-weights")], style={"flex": "1"}),
            html.Div([html.B("activation maps"), html.Br(), _img("fil-acts"), html.Br(),
                      html.B("activation-gradient maps"), html.Br(), _img("fil-actgrads")], style={"flex": "1"}),
        ], style={"display": "flex", "gap": "12px"}),
        html.H4("Redundancy hints"),
        _steering_controls("steer-filters", [html.Div(id="fil-hints")]),
        html.Div(id="fil-feedback", style={"fontSize": "13px", "color": "#555"}),
    ])

    analysis = RunSource(hub.recording_dirs())
    register_analysis_callbacks(app, analysis, page_ticks=("tick-explore", "tick-compare"))

    # A function, so every page load lists the recordings present then (the analysis pages read them at build time).
    app.layout = lambda: html.Div([
        html.Div([
            html.H2("revacnn", style={"margin": "0 12px 0 0"}),
            dcc.Dropdown(id="run-select", clearable=False, style={"width": "520px"}),
            dcc.Dropdown(id="replay-step", placeholder="snapshot step", clearable=False,
                         style={"width": "160px", "display": "none"}),
            html.Div(id="conn-banner", style={"marginLeft": "12px", "fontWeight": "bold"}),
        ], style={"display": "flex", "alignItems": "center", "gap": "8px"}),
        html.Div(id="run-summary", style={"fontSize": "13px", "color": "#444", "margin": "4px 0"}),
        dcc.Interval(id="tick", interval=interval_ms),
        *[dcc.Store(id=f"tick-{name}") for name in TAB_TICKS],
        dcc.Store(id="train-cursor"), dcc.Store(id="net-expanded"), dcc.Store(id="net-sig"),
        dcc.Store(id="net-selected"), dcc.Store(id="net-anim"), dcc.Store(id="net-anim-out"),
        dcc.Store(id="fil-sig"), dcc.Store(id="event-sig"),
        dcc.Tabs(id="tabs", value="training", children=[
            dcc.Tab(label="Training", value="training", children=training),
            dcc.Tab(label="Network", value="network", children=network),
            dcc.Tab(label="Embedding", value="embedding", children=embedding),
            dcc.Tab(label="Filters", value="filters", children=filters),
            dcc.Tab(label="Compare snapshots", value="compare", children=comparison_layout(analysis)),
            dcc.Tab(label="Explore log", value="explore", children=explorer_layout(analysis)),
        ]),
        html.H4("Event log (steering commands)", style={"marginBottom": "2px"}),
        html.Div(id="event-log", style={"maxHeight": "220px", "overflowY": "auto", "fontSize": "13px"}),
    ], style={"fontFamily": "sans-serif", "margin": "8px"})

    def state_of(key: str | None) -> RunState | None:
        return hub.get(key)

    app.clientside_callback(TAB_TICK_JS, *[Output(f"tick-{name}", "data") for name in TAB_TICKS],
                            Input("tick", "n_intervals"), Input("tabs", "value"))

    # -- header ----------------------------------------------------------------------------------------------------
    @app.callback(Output("run-select", "options"), Output("run-select", "value"), Output("conn-banner", "children"),
                  Output("conn-banner", "style"), Output("run-summary", "children"),
                  Output("replay-step", "options"), Output("replay-step", "style"), Output("replay-step", "value"),
                  *[Output(id_, prop) for id_ in STEERING_CONTROLS for prop in ("disabled", "title")],
                  Input("tick", "n_intervals"), State("run-select", "value"), State("run-select", "options"),
                  State("replay-step", "value"), State("replay-step", "options"), State("replay-step", "style"),
                  State(STEERING_CONTROLS[0], "title"))
    def header(_n, shown_key, shown_options, replay_value, replay_options, replay_style, shown_lock):
        # Outputs that did not change are not sent: a new run-select value would fire every view that takes it.
        def changed(new, shown):
            return no_update if new == shown else new

        def steering_lock(reason: str) -> list:  # the fieldsets always change together: one of them tells
            if reason == (shown_lock or ""):
                return [no_update] * (2 * len(STEERING_CONTROLS))
            return [bool(reason), reason] * len(STEERING_CONTROLS)

        options = hub.options()
        key = shown_key if shown_key in {o["value"] for o in options} else (options[0]["value"] if options else None)
        state = state_of(key)
        if state is None:
            return changed(options, shown_options), changed(key, shown_key), "no runs: pass --connect or --logdir", \
                {"color": "#c62828"}, "", changed([], replay_options), changed({"display": "none"}, replay_style), \
                changed(None, replay_value), *steering_lock("no run to steer")
        s = state.summary()
        banner = banner_children(s)
        style = {"marginLeft": "12px", "fontWeight": "bold", "color": STATUS_COLOURS.get(s["conn"], "#000")}
        last = s["last"]
        parts = [f"run {s['run_id'] or '?'}", f"state {s['state'] or '?'}", f"step {s['step']}",
                 f"epoch {s['epoch']}"]
        if resumed := resumed_text(s.get("resumed")):
            parts.insert(1, resumed)
        if last.get("loss") is not None:
            parts.append(f"loss {last['loss']:.4f}")
        if last.get("samples_per_s") is not None and np.isfinite(last["samples_per_s"]):
            parts.append(f"{last['samples_per_s']:.0f} samples/s")
        if s["gaps"]:
            parts.append(f"{s['gaps']} telemetry messages dropped")
        steps = getattr(state, "replay_steps", None)
        step_opts, step_style, step_value = [], {"display": "none"}, None
        if state.source == "replay" and steps:
            step_opts = [{"label": f"step {st}", "value": st} for st in steps]
            step_style = {"width": "160px"}
            step_value = replay_value if replay_value in steps else getattr(state, "replay_step", steps[-1])
        return changed(options, shown_options), changed(key, shown_key), banner, style, " · ".join(parts), \
            changed(step_opts, replay_options), changed(step_style, replay_style), changed(step_value, replay_value), \
            *steering_lock(steering_unavailable(s))

    @app.callback(Output("replay-step", "className"), Input("replay-step", "value"), State("run-select", "value"),
                  prevent_initial_call=True)
    def replay_step(step, key):
        state = state_of(key)
        reader = hub.replays.get(key)
        if state is None or reader is None or step is None or step == getattr(state, "replay_step", None):
            return no_update
        load_replay(state, reader, step=int(step))
        return "loaded"

    # -- training view ---------------------------------------------------------------------------------------------
    @app.callback(Output("train-graph", "figure"), Output("train-cursor", "data"), Output("hp-now", "children"),
                  Input("tick-training", "data"), Input("run-select", "value"), State("train-cursor", "data"),
                  State("tabs", "value"))
    def training_chart(_n, key, cursor, tab):
        state = state_of(key)
        if state is None:
            return go.Figure(), None, ""
        hp = state.hparams or {}
        groups = hp.get("groups") or [{}]
        hp_text = (f"lr {groups[0].get('lr')}, momentum {groups[0].get('momentum')}, weight decay "
                   f"{groups[0].get('weight_decay')}, batch size {hp.get('batch_size')}, optimizer "
                   f"{hp.get('optimizer')}") if hp else "(waiting for hparams)"
        if tab != "training" and cursor and cursor.get("key") == key:
            return no_update, no_update, hp_text
        # markers for the commands applied by this trainer process (a restarted one starts a new step axis)
        events = [e for e in state.event_list() if e["status"] == "done" and e["step"] is not None
                  and e["generation"] == state.generation]
        val = state.val_history()
        marker_sig = [e["id"] for e in events]
        full = (not cursor or cursor.get("key") != key or cursor.get("gen") != state.generation)
        if not full:
            cols, start, total = state.scalars_since(cursor["count"])
            # Redrawn from the ring when it wrapped past what the browser has, and when the browser's chart has
            # grown to 1.5 rings: the page then holds at most that many points however long the run.
            full = start > cursor["count"] or total - cursor.get("first", 0) > state.scalars.capacity * 3 // 2
        if full:
            cols, start, total = state.scalars_since(0)
            fig = _training_figure(cols, val, events)
            return fig, {"key": key, "gen": state.generation, "count": total, "first": start,
                         "markers": marker_sig, "val": len(val), "acc": _has_accuracy(cols, val)}, hp_text
        patch = Patch()
        has_acc = cursor.get("acc") or _has_accuracy(cols, val)
        if has_acc and not cursor.get("acc"):  # the first accuracy: the panel gets its title and autorange back
            patch["layout"]["yaxis2"]["title"]["text"] = "accuracy"
            patch["layout"]["yaxis2"]["autorange"] = True
        if total > cursor["count"]:
            x = _list(cols["step"])
            for trace, name in ((0, "loss"), (2, "train_acc"), (4, "lr")):
                patch["data"][trace]["x"].extend(x)
                patch["data"][trace]["y"].extend(_list(cols[name]))
        if len(val) != cursor.get("val"):
            patch["data"][1]["x"] = [v["step"] for v in val]
            patch["data"][1]["y"] = [v["val_loss"] for v in val]
            patch["data"][3]["x"] = [v["step"] for v in val]
            patch["data"][3]["y"] = [v["val_acc"] for v in val]
        if marker_sig != cursor.get("markers"):
            shapes, notes = _markers(events)
            patch["layout"]["shapes"] = shapes
            patch["layout"]["annotations"] = notes
        return patch, {**cursor, "count": total, "markers": marker_sig, "val": len(val), "acc": has_acc}, hp_text

    @app.callback(Output("train-feedback", "children"),
                  Input("btn-lr", "n_clicks"), Input("btn-momentum", "n_clicks"), Input("btn-wd", "n_clicks"),
                  Input("btn-bs", "n_clicks"), Input("btn-pause", "n_clicks"), Input("btn-resume", "n_clicks"),
                  Input("btn-stop", "n_clicks"), Input("btn-snapshot", "n_clicks"), Input("run-select", "value"),
                  State("in-lr", "value"), State("in-momentum", "value"), State("in-wd", "value"),
                  State("in-bs", "value"), prevent_initial_call=True)
    def training_commands(*args):
        key, lr, momentum, wd, bs = args[8:]
        state = state_of(key)
        trigger = ctx.triggered_id
        if trigger == "run-select":
            return ""       # the feedback was about the run shown before
        if state is None or not trigger:
            return no_update
        values = {"btn-lr": ("set_hparams", "lr", lr), "btn-momentum": ("set_hparams", "momentum", momentum),
                  "btn-wd": ("set_hparams", "weight_decay", wd), "btn-bs": ("set_batch_size", "batch_size", bs)}
        if trigger in values:
            op, field, value = values[trigger]
            if value is None:
                return f"enter a value for {field} first"
            args_ = {field: int(value) if field == "batch_size" else float(value)}
        else:
            op, args_ = trigger.removeprefix("btn-"), {}
        state.submit(op, args_)
        return f"sent {op} {args_ or ''} at {time.strftime('%H:%M:%S')}"

    @app.callback(Output("event-log", "children"), Output("event-sig", "data"), Input("tick", "n_intervals"),
                  Input("run-select", "value"), State("event-sig", "data"))
    def event_log(_n, key, sig):
        state = state_of(key)
        if state is None:
            return "", None
        events = state.event_list()[::-1][:100]
        new_sig = [key, [[e[name] for name in ("id", "status", "step", "label", "error", "note")] for e in events]]
        if new_sig == sig:
            return no_update, no_update      # the table is as shown: nothing to send or redraw
        return _event_table(events), new_sig

    # -- network view ----------------------------------------------------------------------------------------------
    @app.callback(Output("net-graph", "figure"), Output("net-anim", "data"), Output("net-sig", "data"),
                  Output("net-layer", "options"),
                  Input("tick-network", "data"), Input("net-expanded", "data"), Input("run-select", "value"),
                  State("tabs", "value"), State("net-sig", "data"))
    def network_view(_n, expanded, key, tab, sig):
        state = state_of(key)
        if state is None or state.structure is None or tab != "network":
            return no_update, no_update, no_update, no_update
        structure = state.structure
        latest = state.latest_filters()
        names = [l["name"] for l in structure["layers"]]
        if expanded is None or expanded.get("key") != key:
            exp = default_expanded(names)
        else:
            exp = expanded["ids"]
        new_sig = [key, state.generation, structure.get("revision"), latest[0] if latest else None, exp,
                   [l.get("frozen") for l in structure["layers"]], [l["out"] for l in structure["layers"]]]
        if new_sig == sig:
            return no_update, no_update, no_update, no_update
        fields = state.filters_by_layer()
        model = network_model(structure, fields, exp)
        fig, _ = _network_figure(model)
        anim = {"uid": NODES_UID, "amp": jitter_pixels([n["jitter"] for n in model["nodes"]]),
                "t": time.time()}
        options = [{"label": f"{l['name']} ({l['type']}, {l['out']} out)", "value": l["name"]}
                   for l in structure["layers"]]
        return fig, anim, new_sig, options

    app.clientside_callback(JITTER_JS, Output("net-anim-out", "data"), Input("net-anim", "data"))

    @app.callback(Output("net-expanded", "data"), Output("net-selected", "data"), Output("net-layer", "value"),
                  Input("net-graph", "clickData"), Input("btn-expand-all", "n_clicks"),
                  Input("btn-collapse-all", "n_clicks"), Input("btn-default-grouping", "n_clicks"),
                  Input("net-layer", "value"),
                  State("net-expanded", "data"), State("run-select", "value"), State("net-selected", "data"),
                  prevent_initial_call=True)
    def network_click(click, _a, _b, _c, layer_value, expanded, key, selected):
        state = state_of(key)
        if state is None or state.structure is None:
            return no_update, no_update, no_update
        names = [l["name"] for l in state.structure["layers"]]
        exp = expanded["ids"] if expanded and expanded.get("key") == key else default_expanded(names)
        trigger = ctx.triggered_id
        if trigger == "btn-expand-all":
            return {"key": key, "ids": _all_groups(names)}, no_update, no_update
        if trigger == "btn-collapse-all":
            return {"key": key, "ids": [""]}, no_update, no_update
        if trigger == "btn-default-grouping":
            return {"key": key, "ids": default_expanded(names)}, no_update, no_update
        if trigger == "net-layer":
            if selected and selected.get("layer") == layer_value:
                return no_update, no_update, no_update
            return no_update, {"layer": layer_value, "filters": None}, no_update
        if not click or not click.get("points"):
            return no_update, no_update, no_update
        cd = click["points"][0].get("customdata")
        if not cd:
            return no_update, no_update, no_update
        layer, start, count, group = cd
        new_exp = no_update
        if group:
            new_exp = {"key": key, "ids": sorted(set(exp) | _ancestors(group))}
        if layer:
            sel = {"layer": layer, "filters": list(range(int(start), int(start) + int(count))) if count else None}
            return new_exp, sel, layer
        return new_exp, no_update, no_update

    @app.callback(Output("net-details", "children"), Output("net-filter-img", "src"), Output("net-act-img", "src"),
                  Output("net-probe", "options"), Output("net-probe", "value"),
                  Input("net-selected", "data"), Input("tick-network", "data"), Input("net-probe", "value"),
                  State("run-select", "value"), State("tabs", "value"))
    def network_details(selected, _n, probe, key, tab):
        state = state_of(key)
        if state is None or tab != "network" and ctx.triggered_id == "tick-network":
            return no_update, no_update, no_update, no_update, no_update
        if not selected or not selected.get("layer") or state.structure is None:
            return html.Div("click a node or pick a layer", style={"color": "#777"}), "", "", [], no_update
        name = selected["layer"]
        layer = next((l for l in state.structure["layers"] if l["name"] == name), None)
        if layer is None:
            return html.Div(f"{name} is no longer in the model"), "", "", [], no_update
        filters = selected.get("filters")
        fields = state.filters_by_layer().get(name, {})
        lines = [html.Div([html.B(name), f" — {layer['type']} {layer.get('in')}→{layer['out']}, kernel "
                                         f"{layer.get('kernel')}, {layer.get('params')} params, frozen: "
                                         f"{layer.get('frozen') or 'no'}"])]
        ratio = state.layer_ratio.get(name)
        if ratio is not None:
            lines.append(html.Div(f"layer ‖g‖/‖w‖ = {ratio:.3g}"))
        sel = filters if filters else list(range(int(layer["out"])))
        if fields:
            rows = []
            for f, arr in fields.items():
                vals = arr[[i for i in sel if i < len(arr)]]
                rows.append(html.Tr([html.Td(f), html.Td(f"{float(np.mean(vals)):.4g}" if len(vals) else "–")]))
            lines.append(html.Div(f"filter {sel[0]}" if filters and len(filters) == 1 else
                                  f"{'filters ' + str(sel[0]) + '–' + str(sel[-1]) if filters else 'layer mean'}"))
            lines.append(html.Table(rows, className="net-stats"))
        snap = state.snapshot
        filt_src = act_src = ""
        probes, shown = [], no_update
        if snap is not None:
            w = snap.arrays.get("weight/" + name)
            i = sel[0]
            if w is not None and i < len(w):
                image = filter_image(w[i])
                filt_src = (data_uri(image, scale=max(1, min(96 // w.shape[-1], 300 // image.shape[1])))
                            if w.ndim >= 4 else data_uri(fit_rows(image, width=300)))
            a = snap.arrays.get("act/" + name)
            if a is not None:
                classes = snap.body.get("probe_labels") or []  # empty where the labels are not class indices
                probes = [{"label": f"#{p} (label {classes[p]})" if p < len(classes) else f"#{p}", "value": p}
                          for p in range(len(a))]
                p = shown = int(probe or 0) if int(probe or 0) < len(a) else 0
                if a.ndim == 4 and i < a.shape[1]:
                    act_src = data_uri(to_uint8(a[p, i]), scale=max(1, 96 // a.shape[-1]))
                elif a.ndim > 4 and i < a.shape[1]:  # a 3-D conv: the filter's depth slices in a row
                    image = activation_image(a[p, i][None])
                    act_src = data_uri(image, scale=max(1, min(96 // a.shape[-1], 300 // image.shape[1])))
                elif a.ndim == 2:  # a Linear: one value per filter
                    act_src = data_uri(fit_rows(to_uint8(a[p][None, :]), width=300))
                elif a.ndim == 3 and i < a.shape[1]:  # a Conv1d, or a Linear on tokens: the filter's sequence
                    act_src = data_uri(fit_rows(to_uint8(a[p, i][None, :]), width=300))
            missing = missing_maps_reason(snap.body, snap.arrays, name)
            lines.append(html.Div(f"snapshot at step {snap.body.get('step')}" + (f" · {missing}" if missing else ""),
                                  style={"color": "#777"}))
        # The value goes out with the options: the dropdown drops a value its options (empty until a layer is
        # picked) do not hold, and showed an empty box over probe image 0's map.
        return lines, filt_src, act_src, probes, shown

    @app.callback(Output("net-feedback", "children"),
                  Input("btn-freeze-filter", "n_clicks"), Input("btn-unfreeze-filter", "n_clicks"),
                  Input("btn-remove-filter", "n_clicks"), Input("btn-freeze-layer", "n_clicks"),
                  Input("btn-unfreeze-layer", "n_clicks"), Input("btn-widen", "n_clicks"),
                  Input("btn-insert-layer", "n_clicks"), Input("btn-remove-layer", "n_clicks"),
                  Input("run-select", "value"), State("net-selected", "data"), State("widen-k", "value"),
                  State("insert-bn", "value"), prevent_initial_call=True)
    def network_commands(*args):
        key, selected, k, bn = args[8:]
        state = state_of(key)
        trigger = ctx.triggered_id
        if trigger == "run-select":
            return ""
        if state is None or not trigger:
            return no_update
        if not selected or not selected.get("layer"):
            return "select a layer or filter first (click a node)"
        layer = selected["layer"]
        filters = selected.get("filters")
        if trigger in ("btn-freeze-filter", "btn-unfreeze-filter", "btn-remove-filter") and not filters:
            return "select a filter first (click a filter node)"
        op, cargs = {
            "btn-freeze-filter": ("freeze", {"layer": layer, "filters": filters}),
            "btn-unfreeze-filter": ("unfreeze", {"layer": layer, "filters": filters}),
            "btn-remove-filter": ("remove_filters", {"layer": layer, "filters": filters}),
            "btn-freeze-layer": ("freeze", {"layers": [layer]}),
            "btn-unfreeze-layer": ("unfreeze", {"layers": [layer]}),
            "btn-widen": ("widen", {"layer": layer, "count": int(k or 1)}),
            "btn-insert-layer": ("insert_layer", {"after": layer, "batchnorm": "bn" in (bn or [])}),
            "btn-remove-layer": ("remove_layer", {"layer": layer}),
        }[trigger]
        state.submit(op, cargs)
        return f"sent {op} {cargs} — see the event log for the ack"

    # -- embedding view ----------------------------------------------------------------------------------------------
    @app.callback(Output("emb-layer", "options"), Output("emb-layer", "value"), Output("emb-probe", "options"),
                  Output("fil-layer", "options"), Output("fil-layer", "value"), Output("fil-probe", "options"),
                  Input("tick-layers", "data"), Input("run-select", "value"), State("emb-layer", "value"),
                  State("fil-layer", "value"), State("emb-layer", "options"), State("emb-probe", "options"))
    def layer_options(_n, key, emb_layer, fil_layer, old_opts, old_probes):
        state = state_of(key)
        if state is None or state.structure is None:
            return [], None, [], [], None, []
        opts = [{"label": l["name"], "value": l["name"]} for l in state.structure["layers"]]
        names = [o["value"] for o in opts]
        if not names:  # the run monitors no layer (its module has none): nothing to choose
            return [], None, [], [], None, []
        snap = state.snapshot
        n_probe = len(snap.arrays.get("probe_images", [])) if snap is not None else 0
        probes = [{"label": str(i), "value": i} for i in range(n_probe)]
        if opts == old_opts and probes == old_probes and emb_layer in names and fil_layer in names:
            return no_update, no_update, no_update, no_update, no_update, no_update
        emb_layer = emb_layer if emb_layer in names else (names[1] if len(names) > 1 else names[0])
        fil_layer = fil_layer if fil_layer in names else names[0]
        return opts, emb_layer, probes, opts, fil_layer, probes

    @app.callback(Output("emb-graph", "figure"), Output("emb-status", "children"), Output("emb-data", "data"),
                  Input("tick-embedding", "data"), Input("emb-layer", "value"), Input("emb-source", "value"),
                  Input("emb-method", "value"), Input("emb-colour", "value"), Input("emb-probe", "value"),
                  State("tabs", "value"), State("run-select", "value"), State("emb-data", "data"))
    def embedding_view(_n, layer, source, method, colour, probe, tab, key, current):
        state = state_of(key)
        umap_text = hub.embeddings.umap_status()
        if tab != "embedding":
            return no_update, no_update, no_update
        if state is not None and _monitors_no_layer(state):
            return go.Figure(), NO_LAYER, None
        if state is None or layer is None or state.snapshot is None:
            return no_update, f"waiting for a snapshot · {umap_text}", no_update
        snap = state.snapshot
        snap_key = (state.generation, snap.seq, snap.body.get("step"))
        ids = next((l.get("filter_ids") for l in (state.structure or {}).get("layers", []) if l["name"] == layer),
                   None) or []
        probe = int(probe or 0)
        missing = missing_maps_reason(snap.body, snap.arrays, layer) if source in ("act", "actgrad") else None
        if missing:
            return go.Figure(), f"cannot embed: {missing} · {umap_text}", None
        job = [key, list(snap_key), layer, source, method, probe, colour]
        result = hub.embeddings.request(key, snap_key, snap.arrays, ids, layer, source, method, probe, colour)
        if result is None:
            return no_update, f"computing {method.upper()} of {layer} ({source}) at step {snap.body.get('step')}… " \
                              f"· {umap_text}", no_update
        if "error" in result:
            return go.Figure(), f"cannot embed: {result['error']} · {umap_text}", None
        if current and current.get("job") == job:
            return no_update, no_update, no_update
        fig = _embedding_figure(result, colour, layer, source, method, snap.body.get("step"))
        status = (f"{method.upper()} of {result['n']} filters of {layer} ({source}) at step {snap.body.get('step')}"
                  f" in {result['seconds']:.2f} s{' · aligned to the previous layout' if result['aligned'] else ''}"
                  f" · {umap_text}")
        if result.get("not_finite"):  # a diverged run: its points collapse onto the zeros they are drawn as
            status += f" · ⚠ {result['not_finite']} of {result['n']} filters hold NaN or inf, embedded as zeros"
        return fig, status, {"job": job, "coords": result["coords"], "layer": layer}

    @app.callback(Output("emb-hover-img", "src"), Output("emb-hover-text", "children"),
                  Input("emb-graph", "hoverData"), State("emb-data", "data"), State("run-select", "value"))
    def embedding_hover(hover, data, key):
        state = state_of(key)
        if not hover or not data or state is None or state.snapshot is None:
            return "", ""
        i = int(hover["points"][0].get("pointIndex", hover["points"][0].get("pointNumber", 0)))
        w = state.snapshot.arrays.get("weight/" + data["layer"])
        if w is None or i >= len(w):
            return "", ""
        return data_uri(filter_image(w[i]), scale=max(1, 120 // max(w.shape[-1], 1)) if w.ndim == 4 else 2), \
            f"{data['layer']} filter {i}"

    app.clientside_callback(DRAG_JS, Output("emb-drag-installed", "data"), Input("emb-data", "data"))

    @app.callback(Output("emb-feedback", "children"), Input("emb-drop", "data"),
                  State("emb-data", "data"), State("run-select", "value"), prevent_initial_call=True)
    def embedding_drag(drop, data, key):
        state = state_of(key)
        if not drop or not data or state is None:
            return no_update
        idx = int(drop["index"])
        point = (float(drop["x"]), float(drop["y"]))
        coords = np.array(data["coords"], dtype=float)
        neighbours, distances = nearest_neighbours(coords, point, exclude=idx, k=4)
        state.submit("reinit_filters", {"layer": data["layer"], "filters": [idx], "mode": "neighbours",
                                        "neighbours": neighbours, "distances": distances})
        return f"re-initialise {data['layer']} filter {idx} from filters {neighbours} — see the event log"

    # -- filters view ------------------------------------------------------------------------------------------------
    @app.callback(Output("fil-weights", "src"), Output("fil-acts", "src"), Output("fil-actgrads", "src"),
                  Output("fil-probe-img", "src"), Output("fil-caption", "children"), Output("fil-hints", "children"),
                  Output("fil-sig", "data"),
                  Input("tick-filters", "data"), Input("fil-layer", "value"), Input("fil-probe", "value"),
                  State("tabs", "value"), State("run-select", "value"), State("fil-sig", "data"))
    def filters_view(_n, layer, probe, tab, key, sig):
        state = state_of(key)
        if tab == "filters" and state is not None and _monitors_no_layer(state):
            return "", "", "", "", NO_LAYER, "", sig
        if tab != "filters" or state is None or layer is None:
            return (no_update,) * 7
        snap = state.snapshot
        latest = state.latest_filters()
        structure = state.structure or {}
        new_sig = [key, state.generation, snap.seq if snap else None, latest[0] if latest else None, layer, probe,
                   structure.get("revision"), [l.get("frozen") for l in structure.get("layers", [])]]
        if new_sig == sig:
            return (no_update,) * 7
        if snap is None:
            return "", "", "", "", "waiting for a snapshot", "", new_sig
        w = snap.arrays.get("weight/" + layer)
        weights = acts = actgrads = probe_img = ""
        caption = f"snapshot at step {snap.body.get('step')}"
        if w is not None:
            if w.ndim == 4 and w.shape[1] == 3:
                weights = data_uri(mosaic([filter_image(f, rgb=True) for f in w], ncols=8, pad=1),
                                   scale=max(1, 48 // w.shape[-1]))
                caption += f" · {len(w)} filters as RGB images (colour = the 3 input channels)"
            elif w.ndim == 4:
                cin = min(w.shape[1], 32)
                tiles = [to_uint8(f[c], symmetric=True) for f in w for c in range(cin)]
                weights = data_uri(mosaic(tiles, ncols=cin, pad=1), scale=max(1, 20 // w.shape[-1]))
                caption += f" · {len(w)} filters (rows) × {cin} input channels (columns); grey = 0"
            elif w.ndim > 4:  # a 3-D conv: per filter, the depth slices of each input channel
                slices = w.reshape(len(w), -1, *w.shape[-2:])[:, :32]
                tiles = [to_uint8(s, symmetric=True) for f in slices for s in f]
                weights = data_uri(mosaic(tiles, ncols=slices.shape[1], pad=1), scale=max(1, 20 // w.shape[-1]))
                caption += (f" · {len(w)} filters (rows) × {slices.shape[1]} slices (columns: the {w.shape[2]} depth "
                            f"slices of each input channel); grey = 0")
            else:
                weights = data_uri(fit_rows(to_uint8(w.reshape(len(w), -1), symmetric=True)))
                caption += f" · weight matrix {tuple(w.shape)}, a row per filter"
        p = int(probe or 0)
        for name, target in (("act/", "acts"), ("actgrad/", "actgrads")):
            a = snap.arrays.get(name + layer)
            if a is None or p >= len(a):
                continue
            image = activation_image(a[p], symmetric=name == "actgrad/")
            src = data_uri(image, scale=max(1, 48 // a.shape[-1])) if a.ndim >= 4 else data_uri(fit_rows(image))
            if target == "acts":
                acts = src
            else:
                actgrads = src
        missing = missing_maps_reason(snap.body, snap.arrays, layer)
        if missing:
            caption += f" · {missing}"
        images = snap.arrays.get("probe_images")
        if images is not None and p < len(images):
            img = images[p]
            probe_img = data_uri(to_uint8(np.transpose(img, (1, 2, 0)) if img.shape[0] == 3 else img[0]), scale=2)
        layer_info = next((l for l in structure.get("layers", []) if l["name"] == layer), {})
        frozen = np.zeros(int(layer_info.get("out", 0) or 0), dtype=bool)
        if layer_info.get("frozen") == "all":
            frozen[:] = True
        elif isinstance(layer_info.get("frozen"), list):
            frozen[[i for i in layer_info["frozen"] if i < len(frozen)]] = True
        fields = state.filters_by_layer().get(layer)
        ww = w if w is not None and len(w) == len(frozen) else None
        hints = redundancy(ww, fields, frozen if len(frozen) else None)
        return weights, acts, actgrads, probe_img, caption, _hints_table(layer, hints), new_sig

    @app.callback(Output("fil-feedback", "children"), Input({"type": "hint", "op": ALL, "layer": ALL,
                                                             "filters": ALL}, "n_clicks"),
                  State("run-select", "value"), prevent_initial_call=True)
    def hint_action(clicks, key):
        trigger = ctx.triggered_id
        state = state_of(key)
        if not trigger or state is None or not any(c for c in clicks if c):
            return no_update
        if not ctx.triggered or not ctx.triggered[0].get("value"):
            return no_update
        filters = [int(i) for i in str(trigger["filters"]).split(",")]
        op = trigger["op"]
        layer = trigger["layer"]
        if op == "remove":
            state.submit("remove_filters", {"layer": layer, "filters": filters})
        elif op == "reinit":
            state.submit("reinit_filters", {"layer": layer, "filters": filters, "mode": "random"})
        else:
            state.submit("freeze", {"layer": layer, "filters": filters})
        return f"sent {op} of {layer} filters {filters} — see the event log"

    return app


# ---------------------------------------------------------------------------------------------------------------
# figures


def _event_table(events: list[dict[str, Any]]) -> html.Div | html.Table:
    """The event log: newest command first, its status coloured, its error or note in full."""
    if not events:
        return html.Div("no commands yet", style={"color": "#777"})
    colour = {"pending": "#f9a825", "queued": "#1565c0", "done": "#2e7d32", "error": "#c62828"}
    rows = [html.Tr([html.Th(h) for h in ("sent", "command", "status", "step", "detail")])]
    for e in events:
        detail = e["error"] or (e["note"] or "")
        rows.append(html.Tr([
            html.Td(time.strftime("%H:%M:%S", time.localtime(e["sent"]))),
            html.Td(e["label"]),
            html.Td(e["status"], className=f"ev-{e['status']}",
                    style={"color": colour.get(e["status"]), "fontWeight": "bold"}),
            html.Td("" if e["step"] is None else str(e["step"])),
            html.Td(detail, className="ev-detail")], className="ev-row"))
    return html.Table(rows, style={"borderCollapse": "collapse", "width": "100%"})


def resumed_text(resumed: Any) -> str:
    """"continues run X from step N" for a run resumed from a checkpoint (the heartbeat's ``resumed``), else ""."""
    if not isinstance(resumed, dict) or not isinstance(resumed.get("step"), int):
        return ""
    earlier = f"run {resumed['run']}" if isinstance(resumed.get("run"), str) else "a checkpoint"
    return f"continues {earlier} from step {resumed['step']}"


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
        children.append(html.Span(f"⚠ no finite loss since step {s['loss_not_finite_since']} (NaN or inf: diverged?)",
                                  id="loss-not-finite", style={"marginLeft": "10px", "color": "#c62828",
                                                               "fontWeight": "normal"}))
    if s.get("recording_error"):
        children.append(html.Span(f"⚠ recording stopped: {s['recording_error']}", id="recording-error",
                                  style={"marginLeft": "10px", "color": "#c62828", "fontWeight": "normal"}))
    if s.get("telemetry_error"):
        children.append(html.Span(f"⚠ telemetry stopped (internal error): {s['telemetry_error']}",
                                  id="telemetry-error", style={"marginLeft": "10px", "color": "#c62828",
                                                               "fontWeight": "normal"}))
    return children


def _list(arr: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(arr, dtype=float)]


def _markers(events: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """A dotted line and a label per step of the last 60 applied commands; commands applied at one step (pause,
    re-initialise, resume) share the line, their labels side by side, so none is drawn over another."""
    by_step: dict[int, list[str]] = {}
    for e in events[-60:]:
        by_step.setdefault(e["step"], []).append(e["label"])
    shapes, notes = [], []
    for step, labels in by_step.items():
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": step, "x1": step, "y0": 0,
                       "y1": 1, "line": {"color": "rgba(198,40,40,0.6)", "width": 1, "dash": "dot"}})
        notes.append({"x": step, "xref": "x", "y": 1.0, "yref": "paper", "text": "<br>".join(labels),
                      "showarrow": False, "textangle": -90, "xanchor": "right", "yanchor": "top",
                      "font": {"size": 10, "color": "#c62828"}})
    return shapes, notes


def _has_accuracy(cols: dict[str, np.ndarray], val: list[dict]) -> bool:
    train = np.asarray(cols.get("train_acc", []), dtype=float)
    return bool(np.isfinite(train).any()) or any(v.get("val_acc") is not None and np.isfinite(v["val_acc"])
                                                  for v in val)


def _training_figure(cols: dict[str, np.ndarray], val: list[dict], events: list[dict]) -> go.Figure:
    # axis titles rather than subplot titles: those are annotations, and the steering markers' Patch replaces them
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.04, row_heights=[0.45, 0.35, 0.2])
    fig.update_yaxes(title_text="loss", row=1, col=1)
    if _has_accuracy(cols, val):
        fig.update_yaxes(title_text="accuracy", row=2, col=1)
    else:  # a GAN, a regression, an autoencoder: say so, instead of an empty axis from -1 to 4
        fig.update_yaxes(title_text="accuracy (none logged)", range=[0, 1], row=2, col=1)
    # log: a constant lr gets a readable axis (linear autorange drew 0.02 on -0.5..1), and a 10× change reads the
    # same at any lr
    fig.update_yaxes(title_text="lr", type="log", row=3, col=1)
    x = _list(cols["step"])
    fig.add_trace(go.Scatter(x=x, y=_list(cols["loss"]), name="train loss", mode="lines",
                             line={"width": 1, "color": "#1f77b4"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=[v["step"] for v in val], y=[v["val_loss"] for v in val], name="val loss",
                             mode="lines+markers", line={"color": "#ff7f0e"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=_list(cols["train_acc"]), name="train acc", mode="lines",
                             line={"width": 1, "color": "#2ca02c"}), row=2, col=1)
    fig.add_trace(go.Scatter(x=[v["step"] for v in val], y=[v["val_acc"] for v in val], name="val acc",
                             mode="lines+markers", line={"color": "#d62728"}), row=2, col=1)
    fig.add_trace(go.Scatter(x=x, y=_list(cols["lr"]), name="lr", mode="lines", line={"color": "#9467bd"}),
                  row=3, col=1)
    shapes, notes = _markers(events)
    fig.update_layout(margin={"l": 60, "r": 10, "t": 30, "b": 30}, uirevision="training",
                      legend={"orientation": "h", "y": -0.06}, shapes=shapes, annotations=notes)
    fig.update_xaxes(title_text="step", row=3, col=1)
    return fig


def _network_figure(model: dict[str, Any]) -> tuple[go.Figure, int]:
    nodes, columns, paths = model["nodes"], model["columns"], model["paths"]
    fig = go.Figure()
    buckets = [[], [], [], []]
    for s, t, w in paths:
        b = min(3, int(w * 4))
        buckets[b].append((s, t))
    for b, pairs in enumerate(buckets):
        xs, ys = [], []
        for s, t in pairs:
            xs += [nodes[s]["x"], nodes[t]["x"], None]
            ys += [nodes[s]["y"], nodes[t]["y"], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"width": 0.5 + 1.5 * b, "color": f"rgba(90,90,90,{0.15 + 0.15 * b})"}))
    strength = np.array([np.nan if n["strength"] is None else n["strength"] for n in nodes], dtype=float)
    colours = np.nan_to_num(strength, nan=0.0).tolist()
    text = []
    for n in nodes:
        parts = [n["label"]]
        for label, k in (("act |a|", "strength"), ("grad² (jitter)", "jitter"), ("|grad|", "grad"),
                         ("update ratio", "update"), ("‖w‖", "norm")):
            if n.get(k) is not None:
                parts.append(f"{label}: {n[k]:.3g}")
        if n["frozen"]:
            parts.append("❄ frozen")
        if n.get("group"):
            parts.append("click to expand")
        text.append("<br>".join(parts))
    custom = [[n.get("layer") or "", (n["filters"] or [0])[0], len(n["filters"]) if n["filters"] else 0,
               n.get("group") or ""] for n in nodes]
    sizes = [16 if n.get("group") else (11 if n["filters"] and len(n["filters"]) == 1 else 14) for n in nodes]
    fig.add_trace(go.Scatter(
        x=[n["x"] for n in nodes], y=[n["y"] for n in nodes], mode="markers", text=text, hoverinfo="text",
        customdata=custom, showlegend=False, uid=NODES_UID,
        marker={"size": sizes, "color": colours, "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": {"text": "mean |act|"}, "thickness": 10},
                "symbol": ["square" if n.get("group") else ("x" if n["frozen"] else "circle") for n in nodes],
                "line": {"width": [3 if n["frozen"] else 1 for n in nodes],
                         "color": ["#29b6f6" if n["frozen"] else "#333" for n in nodes]}}))
    shapes, notes = [], []
    crowded = len(columns) > 8
    for ci, col in enumerate(columns):
        label = col["label"] + (" ❄" if col.get("frozen") else (" (❄ part)" if col.get("partly_frozen") else ""))
        # many columns: stagger the labels on two rows so they do not overlap
        notes.append({"x": col["x"], "y": 1.06 if crowded and ci % 2 else 1.02, "xref": "x", "yref": "paper",
                      "text": label, "showarrow": False,
                      "font": {"size": 10 if crowded else 11, "color": "#0277bd" if col.get("frozen") else "#222"}})
        notes.append({"x": col["x"], "y": -0.03, "xref": "x", "yref": "paper", "text": col["caption"],
                      "showarrow": False, "font": {"size": 10, "color": "#777"}})
        if col.get("frozen"):
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": col["x"] - 0.3, "x1": col["x"] + 0.3,
                           "y0": 0, "y1": 1, "fillcolor": "rgba(41,182,246,0.15)", "line": {"width": 0},
                           "layer": "below"})
    if not columns:
        notes.append({"x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "text": NO_LAYER, "showarrow": False,
                      "font": {"size": 13, "color": "#555"}})
    fig.update_layout(shapes=shapes, annotations=notes, margin={"l": 10, "r": 10, "t": 55, "b": 30},
                      xaxis={"visible": False, "range": [-0.6, max(0.6, len(columns) - 0.4)]},
                      yaxis={"visible": False, "range": [-0.02, 1.02]}, plot_bgcolor="white",
                      uirevision="network", hovermode="closest")
    return fig, len(fig.data) - 1


def _embedding_figure(result: dict[str, Any], colour: str, layer: str, source: str, method: str, step) -> go.Figure:
    coords = np.array(result["coords"], dtype=float)
    if colour == "cluster" and "cluster" in result:
        palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
        marker = {"size": 12, "color": [palette[int(k) % len(palette)] for k in result["cluster"]]}
    else:
        marker = {"size": 12, "color": result["grad"], "colorscale": "Inferno", "showscale": True,
                  "colorbar": {"title": {"text": "mean |grad|"}}}
    ids = result["ids"]
    fig = go.Figure(go.Scatter(
        x=coords[:, 0], y=coords[:, 1], mode="markers+text", text=[str(i) for i in range(len(coords))],
        textposition="top center", textfont={"size": 9}, customdata=ids,
        hovertemplate="filter %{text} (id %{customdata})<extra></extra>",
        marker=marker))
    fig.update_layout(
        margin={"l": 30, "r": 10, "t": 30, "b": 30}, title={"text": f"{method.upper()} · {layer} · {source} · "
                                                                    f"step {step}", "font": {"size": 13}},
        uirevision=f"{layer}-{source}-{method}", plot_bgcolor="#fafafa", hovermode="closest")
    return fig


def _hints_table(layer: str, hints: dict[str, list]) -> html.Div:
    rows = []

    def actions(filters: list[int]) -> html.Td:
        f = ",".join(map(str, filters))
        return html.Td([html.Button(label, id={"type": "hint", "op": op, "layer": layer, "filters": f},
                                    n_clicks=0, style={"margin": "1px"})
                        for op, label in (("remove", "remove"), ("reinit", "re-initialise"), ("freeze", "freeze"))])

    for a, b, c in hints["duplicates"][:20]:
        rows.append(html.Tr([html.Td("near-duplicate"), html.Td(f"filters {a} and {b}: cosine {c:.3f}"),
                             actions([b])]))
    for i in hints["dead"][:20]:
        rows.append(html.Tr([html.Td("dead"), html.Td(f"filter {i}: ~zero activation"), actions([i])]))
    for i in hints["converged"][:20]:
        rows.append(html.Tr([html.Td("converged"), html.Td(f"filter {i}: ~zero update"), actions([i])]))
    if not rows:
        return html.Div(f"no near-duplicate, dead or converged filters in {layer}", style={"color": "#777"})
    return html.Table(rows)


def _ancestors(group: str) -> set[str]:
    parts = group.split(".")
    return {".".join(parts[:i]) for i in range(len(parts) + 1)}


def _all_groups(names: list[str]) -> list[str]:
    from .viewmodel import layer_tree
    out = []

    def walk(node):
        out.append(node.id)
        for child in node.children.values():
            if len(child.layers) > 1:
                walk(child)

    walk(layer_tree(names))
    return out
