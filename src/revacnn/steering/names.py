"""The layer a command names: the user's name → the ``named_modules()`` name of the module it stands for.

Two things make a model's names differ from the ones its user knows:

- ``torch.compile``: ``model.net = torch.compile(model.net)`` wraps the net in an ``OptimizedModule`` that holds it
  as ``_orig_mod``, so ``net.conv2`` is listed as ``net._orig_mod.conv2``;
- ``insert_layer`` of earlier versions moved the anchor into a Sequential with the new layer (``conv2`` →
  ``conv2.0``); the change log keeps every such move (an ``insert_layer`` entry without ``keeps_anchor``), so the
  old name still finds the layer after such a checkpoint resumes. (``insert_layer`` now keeps the anchor's name.)

``resolve_layer`` applies both, in that order, and raises a ``SteeringError`` that says which names exist when the
name is unknown, and which names to choose from when it could stand for more than one module.
"""

from __future__ import annotations

from torch import nn

from revacnn.recording.lineage import latest_name

from .errors import SteeringError
from .graph import FILTER_LAYERS

COMPILED = "_orig_mod"  # torch.compile's OptimizedModule holds the module it compiled under this name


def without_compiled(name: str) -> str:
    """``name`` without torch.compile's ``_orig_mod`` segments (``net._orig_mod.conv2`` → ``net.conv2``)."""
    return ".".join(part for part in name.split(".") if part != COMPILED)


def renames(changelog: list[dict]) -> dict[str, str]:
    """Old name → new name of every layer an ``insert_layer`` of an earlier version moved into a Sequential."""
    return {entry["anchor"]: entry["anchor"] + ".0" for entry in changelog
            if entry.get("op") == "insert_layer" and isinstance(entry.get("anchor"), str)
            and not entry.get("keeps_anchor")}


def resolve_layer(module: nn.Module, name: str, op: str, changelog: list[dict] = ()) -> str:
    """The name in ``module.named_modules()`` of the layer the user calls ``name``:

    1. ``name`` itself if a module has it, else the one module whose name without ``_orig_mod`` segments is
       ``name`` (torch.compile); several such modules: refused, naming them;
    2. then, if ``insert_layer`` moved that layer (``changelog``), its name now (``conv2`` → ``conv2.0``; the
       Sequential at the old name is not a layer a command can mean: its anchor is).
    """
    modules = dict(module.named_modules())
    if name in modules:
        real = name
    else:
        matches = [n for n in modules if n and without_compiled(n) == name]
        if not matches:
            layers = [n for n, m in modules.items() if isinstance(m, FILTER_LAYERS)]
            raise SteeringError(f"{op}: unknown layer {name!r}; conv and Linear layers are: {', '.join(layers)}")
        if len({id(modules[n]) for n in matches}) > 1:
            raise SteeringError(f"{op}: layer name {name!r} is ambiguous: it can mean any of {', '.join(matches)} "
                                f"(torch.compile's _orig_mod); give one of these names")
        real = matches[0]
    moved = latest_name(real, renames(list(changelog)))
    return moved if moved in modules else real
