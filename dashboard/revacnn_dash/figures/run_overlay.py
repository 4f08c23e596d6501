"""The run overlay's figure: the loss of several runs over their steps, one line per run, named readably."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

MAX_POINTS = 2000      # per run: a 20,000-step curve thinned to every k-th point (a curve, not a scatter)


def thinned(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS) -> tuple[list, list]:
    """Every k-th finite point (the last always), at most ``max_points``: NaN and ±inf (a diverged step) are left
    out of the line rather than breaking it."""
    keep = np.isfinite(steps) & np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if len(steps) > max_points:
        idx = np.unique(np.r_[np.linspace(0, len(steps) - 1, max_points).astype(int), len(steps) - 1])
        steps, values = steps[idx], values[idx]
    return steps.astype(int).tolist(), values.astype(float).tolist()


def overlay_figure(curves: list[tuple[str, np.ndarray, np.ndarray]], log_y: bool) -> go.Figure:
    """``curves``: (run name, steps, loss) per run, drawn in that order."""
    fig = go.Figure([go.Scatter(x=x, y=y, mode="lines", name=name, line={"width": 1.5})
                     for name, steps, loss in curves for x, y in [thinned(steps, loss)]])
    fig.update_layout(margin={"l": 50, "r": 10, "t": 30, "b": 40}, xaxis={"title": {"text": "step"}},
                      yaxis={"title": {"text": "training loss"}, "type": "log" if log_y else "linear"},
                      legend={"orientation": "h", "y": -0.2}, uirevision="overlay", plot_bgcolor="white",
                      title={"text": "loss of the runs chosen" if curves else "choose runs to overlay their loss",
                             "font": {"size": 13}})
    return fig
