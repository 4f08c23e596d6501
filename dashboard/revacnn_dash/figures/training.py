"""The training view's chart: loss, accuracy and learning rate over steps, with a marker per applied command.

The chart grows in the browser with ``Patch`` (views/training.py); these builders draw it whole, and the markers
alone when the commands change.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from revacnn.recording.branches import branch_path


def finite_list(arr) -> list:
    """The values as floats, None (a gap plotly draws) for NaN, ±inf and missing ones."""
    out = []
    for v in np.ravel(np.asarray(arr, dtype=object)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        out.append(f if math.isfinite(f) else None)
    return out


#: Rows the markers' labels are staggered over (consecutive commands take the next row), and a label's length.
MARKER_ROWS = 4
LABEL_CHARS = 22


def markers(events: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """A dotted line and a short label per step of the last 60 applied commands. Labels of consecutive steps are
    staggered over ``MARKER_ROWS`` rows, so commands close together do not overlap; commands applied at one step
    (pause, re-initialise, resume) share the line, their label says how many more; hovering a label shows them all."""
    by_step: dict[int, list[str]] = {}
    for e in events[-60:]:
        by_step.setdefault(e["step"], []).append(e["label"])
    shapes, notes = [], []
    for i, (step, labels) in enumerate(sorted(by_step.items())):
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": step, "x1": step, "y0": 0,
                       "y1": 1, "line": {"color": "rgba(198,40,40,0.6)", "width": 1, "dash": "dot"}})
        first = labels[0] if len(labels[0]) <= LABEL_CHARS else labels[0][:LABEL_CHARS - 1] + "…"
        notes.append({"x": step, "xref": "x", "y": 1.0 - 0.045 * (i % MARKER_ROWS), "yref": "paper",
                      "text": first + (f" +{len(labels) - 1}" if len(labels) > 1 else ""),
                      "hovertext": f"step {step}<br>" + "<br>".join(labels), "showarrow": False,
                      "xanchor": "left", "yanchor": "top", "bgcolor": "rgba(255,255,255,0.8)",
                      "font": {"size": 10, "color": "#c62828"}})
    return shapes, notes


def smoothed(values, weight: float, carry: tuple[float, int] = (0.0, 0)) -> tuple[list, tuple[float, int]]:
    """TensorBoard's smoothing: an exponential moving average with ``weight`` (0: none), debiased (its first values
    are not pulled towards 0); NaN and ±inf are gaps and leave the average as it was. ``carry`` (the running sum
    and count) continues it over points appended later; returns the smoothed values and the new carry."""
    total, count = carry
    out = []
    for v in finite_list(values):
        if v is None:
            out.append(None)
            continue
        total, count = weight * total + (1 - weight) * v, count + 1
        debias = 1 - weight ** count if weight > 0 else 1.0
        out.append(total / debias if debias > 0 else v)
    return out, (total, count)


LR_TICKS = 5     # at most this many learning rates get their own tick; more, and the 1-2-5 of each decade do


def lr_values(values, known: list[float] = ()) -> list[float]:
    """The distinct finite, positive learning rates in ``values`` and ``known``, ascending (at most LR_TICKS + 1)."""
    found = set(known)
    for v in finite_list(values):
        if v is not None and v > 0 and len(found) <= LR_TICKS:
            found.add(v)
    return sorted(found)


def lr_axis(values: list[float]) -> dict:
    """The lr panel's ticks: one per learning rate the run used (a constant lr has one, not a decade of clutter),
    else the 1, 2 and 5 of each decade."""
    if 0 < len(values) <= LR_TICKS:
        return {"tickvals": values, "ticktext": [f"{v:g}" for v in values], "dtick": None}
    return {"tickvals": None, "ticktext": None, "dtick": "D2"}


def on_current_path(cols: dict[str, np.ndarray], branches: list[dict[str, Any]]) -> np.ndarray:
    """Which rows lead to the current state: the rows of the last branch, its parent's up to the step it left
    from, and so on (``recording.branches``); the others were abandoned by an undo or rewind."""
    steps = np.asarray(cols["step"], dtype=float)
    row_branch = np.asarray(cols.get("branch", np.zeros(len(steps))), dtype=float)
    if len(branches) <= 1:
        return np.ones(len(steps), bool)
    keep = np.isnan(row_branch)   # a step whose branch is unknown (merged from a recording) is drawn as live
    for branch, limit in branch_path(branches, branches[-1]["branch"]):
        keep |= (row_branch == branch) & (steps <= limit if limit is not None else True)
    return keep


def abandoned_xy(cols: dict[str, np.ndarray], live: np.ndarray) -> tuple[list, list]:
    """The abandoned rows' steps and losses, with a gap between branches (greyed on the chart)."""
    x, y, previous = [], [], None
    rows = np.nonzero(~live)[0]
    for i in rows:
        branch = cols["branch"][i]
        if previous is not None and (branch != previous[0] or i != previous[1] + 1):
            x.append(None)
            y.append(None)
        x += finite_list([cols["step"][i]])
        y += finite_list([cols["loss"][i]])
        previous = (branch, i)
    return x, y


def has_accuracy(cols: dict[str, np.ndarray], val: list[dict]) -> bool:
    train = np.asarray(cols.get("train_acc", []), dtype=float)
    return bool(np.isfinite(train).any()) or any(finite_list([v.get("val_acc")]) != [None] for v in val)


def training_figure(cols: dict[str, np.ndarray], val: list[dict], events: list[dict], log_loss: bool = False,
                    smoothing: float = 0.0, branches: list[dict[str, Any]] | None = None) -> go.Figure:
    """The whole chart. ``log_loss``: the loss axis logarithmic; ``smoothing``: the EMA weight of the smoothed loss
    (trace 5; the raw loss then drawn faint, as TensorBoard does); ``branches``: the run's branch tree — the steps an
    undo or rewind abandoned are drawn grey (trace 6), the others lead to the current state."""
    # axis titles rather than subplot titles: those are annotations, and the steering markers' Patch replaces them
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.04, row_heights=[0.45, 0.35, 0.2])
    fig.update_yaxes(title_text="loss (log)" if log_loss else "loss", type="log" if log_loss else "linear",
                     row=1, col=1)
    if has_accuracy(cols, val):
        fig.update_yaxes(title_text="accuracy", row=2, col=1)
    else:  # a GAN, a regression, an autoencoder: say so, instead of an empty axis from -1 to 4
        fig.update_yaxes(title_text="accuracy (none logged)", range=[0, 1], row=2, col=1)
    # log: a constant lr gets a readable axis (linear autorange drew 0.02 on -0.5..1), and a 10× change reads the
    # same at any lr; the short panel's ticks are the values the run used (lr_axis)
    fig.update_yaxes(title_text="lr", type="log", tickformat="~g", row=3, col=1, **lr_axis(lr_values(cols["lr"])))
    live = on_current_path(cols, branches or [])
    gone_x, gone_y = abandoned_xy(cols, live)
    cols = {k: np.asarray(v)[live] for k, v in cols.items()}
    x = finite_list(cols["step"])
    fig.add_trace(go.Scatter(x=x, y=finite_list(cols["loss"]), name="train loss", mode="lines",
                             opacity=0.35 if smoothing > 0 else 1.0,
                             line={"width": 1, "color": "#1f77b4"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=finite_list([v.get("step") for v in val]),
                             y=finite_list([v.get("val_loss") for v in val]), name="val loss",
                             mode="lines+markers", line={"color": "#ff7f0e"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=finite_list(cols["train_acc"]), name="train acc", mode="lines",
                             line={"width": 1, "color": "#2ca02c"}), row=2, col=1)
    fig.add_trace(go.Scatter(x=finite_list([v.get("step") for v in val]),
                             y=finite_list([v.get("val_acc") for v in val]), name="val acc",
                             mode="lines+markers", line={"color": "#d62728"}), row=2, col=1)
    fig.add_trace(go.Scatter(x=x, y=finite_list(cols["lr"]), name="lr", mode="lines", line={"color": "#9467bd"}),
                  row=3, col=1)
    ema = smoothed(cols["loss"], smoothing)[0] if smoothing > 0 else []
    fig.add_trace(go.Scatter(x=x if smoothing > 0 else [], y=ema, name=f"train loss (smoothed {smoothing:g})",
                             mode="lines", line={"width": 2, "color": "#1f77b4"}, visible=smoothing > 0),
                  row=1, col=1)
    # last: the Patch of views/training.py extends traces 0, 2, 4 and 5 by index
    fig.add_trace(go.Scatter(x=gone_x, y=gone_y, name="abandoned (undo/rewind)", mode="lines",
                             line={"width": 1, "color": "#b0b0b0"}, visible=True if gone_x else "legendonly"),
                  row=1, col=1)
    shapes, notes = markers(events)
    fig.update_layout(margin={"l": 60, "r": 10, "t": 30, "b": 30}, uirevision="training",
                      legend={"orientation": "h", "y": -0.06}, shapes=shapes, annotations=notes)
    fig.update_xaxes(title_text="step", row=3, col=1)
    return fig
