"""The engine's operations, one module per family: freezing (``freeze``), optimizer hyper-parameters
(``hparams``), filters of one layer (``filters``: widen, remove, re-initialise) and whole layers (``layers``: insert,
remove).

Each operation is ``op(engine, args) -> (structural, changes, filter_maps)``: ``args`` have passed
``commands.parse_command``; every check that needs the model runs before the first change.
"""

from __future__ import annotations

from . import filters, freeze, hparams, layers

#: op name -> the function that applies it
OPERATIONS = {
    "freeze": freeze.freeze,
    "unfreeze": freeze.unfreeze,
    "set_hparams": hparams.set_hparams,
    "widen": filters.widen,
    "remove_filters": filters.remove_filters,
    "reinit_filters": filters.reinit_filters,
    "insert_layer": layers.insert_layer,
    "remove_layer": layers.remove_layer,
}
