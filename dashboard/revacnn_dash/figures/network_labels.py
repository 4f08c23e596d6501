"""The network figure's column labels, laid out so that they never overlap: horizontal while every name fits its
column, otherwise turned upright (a column is then at least ``MIN_COLUMN_PX`` wide: the figure widens and the page
scrolls), names shortened to what the margin holds, the full name on hover.

Widths are estimated from the font size (``CHAR_PX`` per character at 10 px: the widest common sans-serif
digits and lower-case letters stay within it), against the narrowest plot the page gives the view
(``MIN_PLOT_PX``)."""

from __future__ import annotations

from typing import Any

MIN_PLOT_PX = 560          # the network graph's narrowest width on a 1,024 px window, less its margins
MIN_COLUMN_PX = 18         # an upright label is ~13 px tall at 10 px: room to spare between columns
CHAR_PX = 6.2              # per character at font size 10
UPRIGHT_CHARS = 24         # the longest upright label: what the top margin holds
FONT = 10


def shorten(name: str, limit: int) -> str:
    """``name`` in at most ``limit`` characters: its dotted parts abbreviated to their first letter from the left,
    the last part kept whole, a letter joined to the index after it (``encoder.stages.0.layers.1.convolution`` →
    ``e.s0.l1.convolution``), then cut from the left with an ellipsis if still too long."""
    if len(name) <= limit:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if not parts[i].isdigit() and len(parts[i]) > 1:
            parts[i] = parts[i][0]
            if len(".".join(parts)) <= limit:
                return ".".join(parts)
    joined: list[str] = []
    for part in parts:
        if joined and part.isdigit() and len(joined[-1]) == 1 and not joined[-1].isdigit():
            joined[-1] += part
        else:
            joined.append(part)
    short = ".".join(joined)
    return short if len(short) <= limit else "…" + short[-(limit - 1):]


def label_layout(labels: list[str], captions: list[str]) -> dict[str, Any]:
    """How to draw the column labels: ``upright`` (bool), the labels' and captions' ``text`` as drawn, the figure
    ``width`` (None: the container's) and the ``top`` and ``bottom`` margins in pixels."""
    n = max(1, len(labels))
    column_px = MIN_PLOT_PX / n
    longest = max((len(t) for t in labels + captions), default=0)
    if longest * CHAR_PX <= column_px - 4:
        return {"upright": False, "text": labels, "captions": captions, "width": None, "top": 55, "bottom": 30}
    text = [shorten(t, UPRIGHT_CHARS) for t in labels]
    tallest = max((len(t) for t in text), default=0)
    cap = max((len(t) for t in captions), default=0)
    width = None if column_px >= MIN_COLUMN_PX else int(n * MIN_COLUMN_PX + 120)   # + the colour bar
    return {"upright": True, "text": text, "captions": captions, "width": width,
            "top": int(20 + tallest * CHAR_PX), "bottom": int(12 + cap * CHAR_PX)}
