"""Layers renamed by a command, followed across the rename. Imports neither torch nor pyarrow (the callback and
the dashboard use it too).

``insert_layer`` moves its anchor into a Sequential (``conv2`` → ``conv2.0``): the layer keeps its filters and their
ids, and its command's result says so in ``changes.renamed`` (old name → new name). The recorder writes the layer's
series on under its first name; readers follow the renames in the recorded acks.
"""

from __future__ import annotations

from typing import Any


def renamed_layers(result: Any) -> dict[str, str]:
    """Old name → new name of the layers a command's result (the steering engine's answer, or the ``result`` of its
    ack) says it renamed; names that did not change and anything malformed are left out."""
    renamed = (result.get("changes") or {}).get("renamed") if isinstance(result, dict) else None
    if not isinstance(renamed, dict):
        return {}
    return {old: new for old, new in renamed.items() if isinstance(old, str) and isinstance(new, str) and old != new}


def renamed_by(ack: dict) -> dict[str, str]:
    """Old name → new name of the layers a command's ack says it renamed; empty unless the ack is ``done``."""
    return renamed_layers(ack.get("result")) if ack.get("status") == "done" else {}


def names_before(layer: str, previous: dict[str, str]) -> list[str]:
    """The names ``layer`` had, oldest first, ending with ``layer`` itself; ``previous``: new name → previous name."""
    names = [layer]
    while names[0] in previous and previous[names[0]] not in names:
        names.insert(0, previous[names[0]])
    return names


def latest_name(layer: str, later: dict[str, str]) -> str:
    """The name ``layer`` has after every rename in ``later`` (old name → new name)."""
    seen = set()
    while layer in later and layer not in seen:
        seen.add(layer)
        layer = later[layer]
    return layer
