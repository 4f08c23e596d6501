"""Tables shown as HTML: the event log of steering commands and the filters view's redundancy hints."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dash_mantine_components as dmc
from dash import html
from revacnn.wire.acks import DONE, ERROR, QUEUED


def event_table(events: list[dict[str, Any]],
                actions: Callable[[dict[str, Any]], Any] | None = None) -> html.Div | html.Table:
    """The event log: newest command first, its status coloured, its ``detail`` (error, what it changed, note) in
    full, and what ``actions`` gives for the command (the Undo button of views/history.py)."""
    if not events:
        return html.Div("no commands yet", style={"color": "#777"})
    colour = {"pending": "#f9a825", QUEUED: "#1565c0", DONE: "#2e7d32", ERROR: "#c62828"}
    rows = [html.Tr([html.Th(h) for h in ("sent", "command", "status", "step", "detail")])]
    for e in events:
        detail = e.get("detail", e["error"] or e["note"] or "")
        rows.append(html.Tr([
            html.Td(time.strftime("%H:%M:%S", time.localtime(e["sent"]))),
            html.Td(e["label"]),
            html.Td(e["status"], className=f"ev-{e['status']}",
                    style={"color": colour.get(e["status"]), "fontWeight": "bold"}),
            html.Td("" if e["step"] is None else str(e["step"])),
            html.Td([detail, actions(e)] if actions else detail, className="ev-detail")], className="ev-row"))
    return html.Table(rows)


def hints_table(layer: str, hints: dict[str, list]) -> html.Div:
    rows = []

    def actions(filters: list[int]) -> html.Td:
        f = ",".join(map(str, filters))
        return html.Td([dmc.Button(label, id={"type": "hint", "op": op, "layer": layer, "filters": f},
                                   n_clicks=0, size="compact-xs", variant="default", style={"margin": "1px"})
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
