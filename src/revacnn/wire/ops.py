"""The steering vocabulary of docs/protocol.md: every command op and what kind of change it makes. No torch.

The trainer (the callback and the steering engine) and the dashboard read their op lists from here, so an op is
added in one place.
"""

from __future__ import annotations

#: Ops the steering engine applies to the model and its optimizer, in the order its error messages list them.
ENGINE_OPS = ("freeze", "unfreeze", "set_hparams", "widen", "remove_filters", "insert_layer", "remove_layer",
              "reinit_filters")
#: Ops the callback applies to the training loop itself; the engine never sees them.
LOOP_OPS = frozenset({"pause", "resume", "stop", "snapshot", "set_batch_size"})

#: Engine ops that change parameter shapes (the change log records them; a copy of the weights kept elsewhere
#: cannot follow them).
STRUCTURAL_OPS = frozenset({"widen", "remove_filters", "insert_layer", "remove_layer"})
#: Ops that freeze or unfreeze layers or filters (they change the frozen marks of ``structure``).
FREEZE_OPS = frozenset({"freeze", "unfreeze"})
#: Ops that act on a list of filters of one layer.
FILTER_LIST_OPS = frozenset({"remove_filters", "reinit_filters"})
#: The op that changes optimizer hyper-parameters, and the hyper-parameters it sets per param group.
SET_HPARAMS = "set_hparams"
HPARAM_NAMES = ("lr", "momentum", "weight_decay")
#: The loop op that changes the training loader's batch size.
SET_BATCH_SIZE = "set_batch_size"
#: Ops that go back to a restore point (docs/protocol.md, "Undo and rewind"): the callback applies them.
UNDO, REWIND = "undo", "rewind"
HISTORY_OPS = frozenset({UNDO, REWIND})
#: Ops before which the callback keeps a restore point (they change the model, optimizer, schedulers or data).
CHANGING_OPS = frozenset({*ENGINE_OPS, SET_BATCH_SIZE})
