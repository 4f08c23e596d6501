"""The training-log explorer's figures: small multiples of a layer statistic per node of the layer tree, the
filters × iterations chart, the validation images × iterations views and the cube (layers × iterations, one class
at a time). Pins (purple) and steering commands (orange) are drawn on every time axis."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..analysis.explorer import horizon_bands
from ..analysis.tracking import overlap_with, shared_with_flagged

PIN_COLOUR, STEER_COLOUR = "#6a1b9a", "#ef6c00"
#: What the multiples' colours mean (a title line: the figure's annotations are the steering marks).
BANDS_LEGEND = ("<br><span style='font-size:10px;color:#555'>band: <span style='color:#6baed6'>■</span> min–max, "
                "<span style='color:#1565c0'>■</span> q1–q3, <span style='color:#0d47a1'>—</span> median of the "
                "node's filters · strip under each: the median's distance from its own median over the run, "
                "<span style='color:#fb6a4a'>■</span> above, <span style='color:#6baed6'>■</span> below, darker = "
                "further (3 bands of a third of the largest)</span>")


def time_marks(fig: go.Figure, pins, events, yref: str = "paper") -> None:
    for event in events:
        fig.add_vline(x=event["step"], line_dash="dash", line_color=STEER_COLOUR, line_width=1)
        fig.add_annotation(x=event["step"], y=1.0, yref="paper", text=event["label"], showarrow=False,
                           font={"size": 9, "color": STEER_COLOUR}, xanchor="left", yanchor="bottom")
    for pin in pins or []:
        fig.add_vline(x=pin, line_color=PIN_COLOUR, line_width=1.5)


def multiples_figure(overview: dict, tree: dict, focus: str, pins, events, xrange) -> go.Figure:
    """A diverged recording's NaN and ±inf are gaps in the bands, quietly."""
    with np.errstate(all="ignore"):
        return _multiples_figure(overview, tree, focus, pins, events, xrange)


def _multiples_figure(overview: dict, tree: dict, focus: str, pins, events, xrange) -> go.Figure:
    """One figure, one x axis, one y axis per row (linked hover with hoversubplots='axis'): for the focused node
    and each child, a min–max band, a q1–q3 band and the median sparkline, then a thin horizon chart."""
    nodes = [focus] + [c for c in tree["nodes"][focus]["children"] if c in overview["nodes"]]
    nodes = [n for n in nodes if n in overview["nodes"]]
    fig = go.Figure()
    rows = len(nodes)
    unit = 1.0 / max(rows, 1)
    layout: dict[str, Any] = {}
    blues = ["#c6dbef", "#6baed6", "#08519c"]
    reds = ["#fcbba1", "#fb6a4a", "#a50f15"]
    for r, node_id in enumerate(nodes):
        data = overview["nodes"][node_id]
        x = data["step"]
        top = 1 - r * unit
        band_axis, horizon_axis = 2 * r + 1, 2 * r + 2
        ya, yh = ("y" if band_axis == 1 else f"y{band_axis}"), f"y{horizon_axis}"
        layout["yaxis" if band_axis == 1 else f"yaxis{band_axis}"] = {
            "domain": [top - unit * 0.72, top - unit * 0.06], "title": {"text": tree["nodes"][node_id]["name"],
                                                                       "font": {"size": 10}},
            "tickfont": {"size": 8}, "type": "log" if np.nanmin(data["min"], initial=np.inf) > 0 else "linear"}
        layout[f"yaxis{horizon_axis}"] = {"domain": [top - unit * 0.98, top - unit * 0.74], "showticklabels": False,
                                          "range": [0, 1]}
        fig.add_trace(go.Scatter(x=x, y=data["max"], mode="lines", line={"width": 0}, yaxis=ya, showlegend=False,
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=data["min"], mode="lines", line={"width": 0}, fill="tonexty",
                                 fillcolor="rgba(21,101,192,0.15)", yaxis=ya, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=data["q3"], mode="lines", line={"width": 0}, yaxis=ya, showlegend=False,
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=data["q1"], mode="lines", line={"width": 0}, fill="tonexty",
                                 fillcolor="rgba(21,101,192,0.35)", yaxis=ya, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=data["median"], mode="lines", line={"width": 1.2, "color": "#0d47a1"},
                                 yaxis=ya, name=node_id, showlegend=False,
                                 customdata=np.stack([data["min"], data["q1"], data["q3"], data["max"]], 1),
                                 hovertemplate=f"{tree['nodes'][node_id]['name']}: median %{{y:.3g}} "
                                               "[min %{customdata[0]:.3g}, q1 %{customdata[1]:.3g}, "
                                               "q3 %{customdata[2]:.3g}, max %{customdata[3]:.3g}]<extra></extra>"))
        pos, neg, height = horizon_bands(np.log10(np.clip(data["median"], 1e-30, None))
                                         if layout["yaxis" if band_axis == 1 else f"yaxis{band_axis}"]["type"] ==
                                         "log" else data["median"])
        for k in range(pos.shape[0]):
            for arr, colours in ((pos, reds), (neg, blues)):
                fig.add_trace(go.Scatter(x=x, y=arr[k] / height, mode="lines", line={"width": 0},
                                         fill="tozeroy", fillcolor=colours[k], yaxis=yh, showlegend=False,
                                         hoverinfo="skip"))
    layout["xaxis"] = {"title": "step", "anchor": f"y{2 * rows}" if rows else "y", "showspikes": True,
                       "spikemode": "across", "spikethickness": 1}
    if xrange:
        layout["xaxis"]["range"] = xrange
    fig.update_layout(**layout)
    fig.update_layout(height=max(260, 110 * rows + 60), margin={"l": 70, "r": 10, "t": 76, "b": 40},
                      hovermode="x", hoversubplots="axis", dragmode="zoom",
                      title={"text": f"{overview['field']} per node — {overview['steps']} rows"
                                     + (" (raw steps)" if overview["raw"] else " (pyramid buckets)") + BANDS_LEGEND,
                             "font": {"size": 12}})
    time_marks(fig, pins, events)
    silent = [tree["nodes"][n]["name"] for n in nodes
              if not np.isfinite(np.asarray(overview["nodes"][n]["median"], dtype=float)).any()]
    if silent:   # a diverged run's series are all NaN or ±inf: say so rather than draw empty rows
        fig.add_annotation(x=0.5, y=1.0, xref="paper", yref="paper", yanchor="bottom", showarrow=False,
                           text=f"⚠ no finite {overview['field']} recorded for {', '.join(silent[:6])}"
                                + (" …" if len(silent) > 6 else "") + " (NaN or ±inf: a diverged run?)",
                           font={"size": 11, "color": "#c62828"})
    return fig


def filter_chart_figure(chart: dict, pins, events, xrange) -> go.Figure:
    steps = chart["step"]
    field = chart["field"]
    colours = {"cosine": "RdBu", "update_ratio": "Viridis"}.get(field, "Viridis")
    z = chart["values"]
    extra = {}
    if field == "cosine":
        finite = z[np.isfinite(z)]
        low = float(np.nanpercentile(finite, 2)) if finite.size else 0.9
        extra = {"zmin": min(low, 0.999), "zmax": 1.0}
    fig = go.Figure(go.Heatmap(z=z, x=steps, y=[str(i) for i in chart["filter_ids"]], colorscale=colours, **extra,
                               hovertemplate="step %{x}<br>filter %{y}<br>" + field + " %{z:.5g}<extra></extra>",
                               colorbar={"title": {"text": field}}))
    note = "" if chart["exact"] else " (pyramid buckets: cosine ≈ 1 − max(update_ratio)²/2)"
    fig.update_layout(title={"text": f"filters × iterations: {field}{note}", "font": {"size": 12}},
                      yaxis={"type": "category", "title": "filter id (similarity order)", "tickfont": {"size": 8}},
                      xaxis={"title": "step", **({"range": xrange} if xrange else {})},
                      margin={"l": 70, "r": 10, "t": 40, "b": 40})
    time_marks(fig, pins, events)
    return fig


def validation_figures(info: dict, klass: int, pins, events) -> tuple[go.Figure, go.Figure]:
    """Per-class error over steps (flagged classes boxed), and one class's images × steps correctness."""
    steps = info["steps"]
    heat = go.Figure(go.Heatmap(z=info["error"], x=steps, y=[str(c) for c in range(info["classes"])],
                                colorscale="Reds", zmin=0, zmax=1, colorbar={"title": {"text": "error"}},
                                text=info["counts"], texttemplate="%{text}",
                                hovertemplate="class %{y}, step %{x}<br>error %{z:.2f}<br>"
                                              "anomalous images %{text}<extra></extra>"))
    fc, ft = np.nonzero(info["flagged"])
    if len(fc):
        heat.add_trace(go.Scatter(x=steps[ft], y=[str(c) for c in fc], mode="markers", name="flagged",
                                  marker={"symbol": "square-open", "size": 16, "color": "#000",
                                          "line": {"width": 2}}, hoverinfo="skip"))
    heat.update_layout(title={"text": "per-class error (numbers: anomalous images; boxes: flagged classes)",
                              "font": {"size": 12}}, xaxis={"title": "step"}, yaxis={"title": "class"},
                       margin={"l": 50, "r": 10, "t": 40, "b": 40})
    time_marks(heat, pins, events)
    klass = int(klass or 0)
    cols = np.nonzero(info["labels"] == klass)[0]
    z = np.where(info["valid"][:, cols], info["correct"][:, cols].astype(float), np.nan).T
    images = go.Figure(go.Heatmap(z=z, x=steps, y=[str(c) for c in cols],
                                  colorscale=[[0, "#c62828"], [1, "#e8f5e9"]], zmin=0, zmax=1, showscale=False,
                                  hovertemplate="image %{y}, step %{x}: %{z}<extra></extra>"))
    fi, fs = np.nonzero(info["flips"][:, cols].T)
    if len(fi):
        images.add_trace(go.Scatter(x=steps[fs], y=[str(cols[i]) for i in fi], mode="markers",
                                    name="stable → flipped", marker={"symbol": "x", "size": 6,
                                                                      "color": "#000"}))
    images.update_layout(title={"text": f"class {klass}: image × iteration correctness (green right, red wrong, "
                                        f"× anomalous)", "font": {"size": 12}},
                         xaxis={"title": "step"}, yaxis={"type": "category", "showticklabels": len(cols) < 60,
                                                         "title": "validation image"},
                         margin={"l": 50, "r": 10, "t": 40, "b": 40})
    time_marks(images, pins, events)
    return heat, images


def cube_figure(data: dict, klass: int | None, pick: dict | None) -> tuple[go.Figure, str]:
    """The cube's ``klass`` slice (any flagged class when None) as layers × validation steps: each cell the top-k
    changed filters of a layer over the interval ending at that step, shaded by how many of them also turned at the
    other steps where the class is flagged (or, with a cell pinned, by their overlap with it); the steps where the
    class is flagged are marked above the plot. Returns the figure and the pinned cell's detail."""
    layers, steps = data["layers"], data["steps"]
    if not steps or not layers:
        return go.Figure(layout={"title": {"text": "no validation samples in this run", "font": {"size": 12}},
                                 "xaxis": {"visible": False}, "yaxis": {"visible": False}}), ""
    who = "any class" if klass is None else f"class {klass}"
    picked = pick is not None and pick.get("layer") in layers and pick.get("step") in steps
    row, col = (layers.index(pick["layer"]), steps.index(pick["step"])) if picked else (0, 0)
    z = overlap_with(data, row, col) if picked else shared_with_flagged(data, klass)
    flagged = data["flagged"]
    at = flagged.any(0) if klass is None else (flagged[klass] if klass < len(flagged) else
                                              np.zeros(len(steps), bool))
    classes_at = [", ".join(map(str, np.nonzero(flagged[:, t])[0])) or "none" for t in range(len(steps))]
    text = [[" ".join(map(str, cell[:6])) + (" …" if len(cell) > 6 else "") for cell in r] for r in data["cells"]]
    meaning = "shared with the pinned cell" if picked else f"also top changed where {who} is flagged"
    fig = go.Figure(go.Heatmap(
        z=z, x=steps, y=layers, text=text, customdata=[classes_at] * len(layers), colorscale="Purples", zmin=0,
        zmax=max(1, int(z.max()) if z.size else 1), xgap=1, ygap=1,
        hovertemplate="%{y} at step %{x}<br>top changed filters: %{text}<br>classes flagged at this step: "
                      "%{customdata}<br>" + meaning + ": %{z}<extra></extra>",
        colorbar={"title": {"text": "shared<br>filters", "font": {"size": 11}}}))
    for step in np.asarray(steps)[at]:
        fig.add_shape(type="line", xref="x", yref="paper", x0=step, x1=step, y0=1.0, y1=1.05,
                      line={"color": STEER_COLOUR, "width": 3})
    detail = ""
    if picked:
        fig.add_trace(go.Scatter(x=[steps[col]], y=[layers[row]], mode="markers", hoverinfo="skip",
                                 marker={"symbol": "square-open", "size": 18, "color": STEER_COLOUR,
                                         "line": {"width": 3}}, showlegend=False))
        chosen = set(data["cells"][row][col])
        others = [f"step {steps[j]}: {sorted(chosen & set(cell))}" for j, cell in enumerate(data["cells"][row])
                  if j != col and chosen & set(cell)]
        per_layer = "\n".join(f"  {layer}: {ids}" for layer, ids in data["top"][steps[col]].items())
        detail = (f"pinned: {layers[row]} at step {steps[col]} (classes flagged: {classes_at[col]}) — top-"
                  f"{data['k']} changed filters {data['cells'][row][col]}\nshared with: "
                  + ("; ".join(others) or "none")
                  + f"\ntop-{data['k']} changed filters of every layer at step {steps[col]} (most changed first):\n"
                  + per_layer)
    never = "" if at.any() else f" — {who} is never flagged with these settings"
    fig.update_layout(
        title={"text": f"cube, {who}: top-{data['k']} changed filters per layer and validation interval; colour = "
                       f"{meaning}{never}<br><span style='font-size:10px;color:#555'><span style='color:"
                       f"{STEER_COLOUR}'>▮</span> above the plot: steps where {who} is flagged · click a cell to "
                       f"pin its step</span>", "font": {"size": 12}},
        xaxis={"title": "step (end of the validation interval)",
               # ticks under the cells (the validation steps) while they fit, else Plotly's own
               **({"tickvals": steps} if len(steps) <= 20 else {})},
        yaxis={"type": "category", "autorange": "reversed", "title": "layer"},
        margin={"l": 140, "r": 10, "t": 70, "b": 50})
    return fig, detail
