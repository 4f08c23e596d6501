"""A steered model's history in checkpoints: the change log that rebuilds its shapes, written into every checkpoint
and replayed before the weights load on resume, and the filter ids that stay stable across changes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.nn.parameter import is_lazy

from revacnn.recording.lineage import renamed_layers

_HOOKS = ("on_load_checkpoint", "on_save_checkpoint")


def has_lazy_parameters(module: nn.Module) -> bool:
    return any(is_lazy(tensor) for tensor in (*module.parameters(), *module.buffers()))


def shaped_like(module: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """Whether ``module`` has exactly the entries and shapes of a saved ``state_dict`` (not while it has lazy,
    still shapeless, parameters)."""
    own = module.state_dict()
    return own.keys() == state_dict.keys() and not any(is_lazy(value) for value in own.values()) and all(
        tuple(value.shape) == tuple(getattr(state_dict[key], "shape", ())) for key, value in own.items())


class ModelHistory:
    """What a model's steering made of it, kept from one fit to the next (a checkpoint must replay every change):
    the change log, the stable id of every filter, and the structure's revision."""

    def __init__(self) -> None:
        self.changelog: list[dict[str, Any]] = []
        self.filter_ids: dict[str, list[int]] = {}
        self.next_filter_id = 0
        self.revision = 0
        self.resumed_run: str | None = None      # the run id a resumed checkpoint was saved by
        # what ``freeze`` froze (``FreezeManager.state()``), from a checkpoint that resumed or an earlier fit of the
        # same module, to freeze again before the first batch trains
        self.frozen_to_restore: dict[str, Any] | None = None

    def state_dict(self, run_id: str) -> dict[str, Any]:
        return {"changelog": self.changelog, "filter_ids": self.filter_ids, "next_filter_id": self.next_filter_id,
                "run_id": run_id, "revision": self.revision}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The change log itself was replayed before the weights loaded (``CheckpointHooks``).
        self.filter_ids = {name: list(ids) for name, ids in state_dict.get("filter_ids", {}).items()}
        self.next_filter_id = int(state_dict.get("next_filter_id", 0))
        self.revision = int(state_dict.get("revision", 0))
        self.resumed_run = state_dict.get("run_id")

    def _new_ids(self, count: int) -> list[int]:
        ids = list(range(self.next_filter_id, self.next_filter_id + count))
        self.next_filter_id += count
        return ids

    def number_filters(self, counts: Mapping[str, int]) -> None:
        """Give new ids to the filters of every layer not numbered yet, or whose filter count changed."""
        for name, count in counts.items():
            if name not in self.filter_ids or len(self.filter_ids[name]) != count:
                self.filter_ids[name] = self._new_ids(count)

    def follow(self, ack: dict[str, Any], renamed_too: list[dict[str, Any]]) -> None:
        """Follow a structural change: renamed layers keep their filters' ids (also in the ``renamed_too`` dicts
        keyed by layer), kept filters keep theirs, added ones get new ones; the revision goes up."""
        # insert_layer moves its anchor into a Sequential (``conv2`` → ``conv2.0``): the same filters, new name
        for old_name, new_name in renamed_layers(ack).items():
            for by_layer in (self.filter_ids, *renamed_too):
                if old_name in by_layer:
                    by_layer[new_name] = by_layer.pop(old_name)
        for name, mapping in (ack.get("filter_maps") or {}).items():
            old = self.filter_ids.get(name, [])
            kept = [old[index] for index in mapping.get("kept", []) if index < len(old)]
            new = self._new_ids(int(mapping.get("added", 0)))
            self.filter_ids[name] = placed(kept, new, mapping.get("added_at"))
        self.revision += 1


def placed(kept: list[int], new: list[int], added_at: Any) -> list[int]:
    """The filter ids of a layer after a resize: ``new`` at the positions ``added_at`` (ascending; a grouped conv's
    new filters sit at the end of their group), ``kept`` in order at the others; appended where ``added_at`` is
    missing (acks from before it existed) or does not fit."""
    width = len(kept) + len(new)
    fits = (isinstance(added_at, list) and len(added_at) == len(new)
            and all(type(p) is int and 0 <= p < width for p in added_at) and added_at == sorted(set(added_at)))
    if not fits:
        return kept + new
    at = dict(zip(added_at, new))
    rest = iter(kept)
    return [at[j] if j in at else next(rest) for j in range(width)]


def changelog_entry(changelog: list[dict[str, Any]], run_id: str,
                    frozen: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds at its ``revacnn`` key: plain types only, so ``revacnn.load_steered`` can rebuild the
    shapes offline; ``frozen`` is what ``freeze`` froze (``FreezeManager.state()``), frozen again on resume."""
    return {"changelog": list(changelog), "run_id": run_id,
            "frozen": frozen if frozen is not None else {"layers": {}, "filters": {}}}


def any_frozen(frozen: dict[str, Any] | None) -> bool:
    return bool(frozen) and bool(frozen.get("layers") or frozen.get("filters"))


class SavesChangelog:
    """Left as the ``on_save_checkpoint`` of a module that a fit steered, once the fit is over: the module's shapes
    are no longer its class's, and a checkpoint saved later (``trainer.save_checkpoint(path, weights_only=True)``)
    still needs the change log that rebuilds them. It then calls the module's own hook. A later fit takes the log
    over and takes this off. Plain attributes, so the module still pickles and deep-copies."""

    def __init__(self, module: nn.Module, changelog: list[dict[str, Any]], run_id: str, own_hook: Any,
                 frozen: dict[str, Any] | None = None) -> None:
        self.module = module
        self.changelog = changelog
        self.run_id = run_id
        self.own_hook = own_hook          # the module's instance-level hook, if it had one
        self.frozen = frozen              # what was frozen when the fit ended (``FreezeManager.state()``)

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["revacnn"] = changelog_entry(self.changelog, self.run_id, self.frozen)
        (self.own_hook or type(self.module).on_save_checkpoint.__get__(self.module))(checkpoint)


class CheckpointHooks:
    """The module's two checkpoint hooks, wrapped on its instance for one fit (the user's class is untouched;
    ``unwrap`` puts the instance back as it was, but for a steered module's ``SavesChangelog``).

    - ``on_load_checkpoint``: on resume, re-apply a steered run's structural changes before Lightning loads the
      weights (it calls this hook just before loading the state_dict; a callback's own hooks run after it, too
      late for shapes).
    - ``on_save_checkpoint``: write the change log into every checkpoint. Lightning calls a callback's
      ``on_save_checkpoint`` for full checkpoints only, so a ``ModelCheckpoint(save_weights_only=True)`` file
      held a steered model's weights without the log that rebuilds its shapes (``load_steered`` failed on it).
    """

    def __init__(self) -> None:
        self._module: pl.LightningModule | None = None
        self._instance_hooks: dict[str, Any] = {}  # the module's own instance-level hooks, put back by ``unwrap``

    def wrap(self, pl_module: pl.LightningModule, history: ModelHistory,
             save: Callable[[dict[str, Any]], None]) -> None:
        """Wrap the hooks; ``save`` writes the callback's entry into a checkpoint."""
        left = pl_module.__dict__.get("on_save_checkpoint")
        if isinstance(left, SavesChangelog):     # an earlier fit steered this module: its changes go on from here
            if not history.changelog:
                history.changelog = list(left.changelog)
            if any_frozen(left.frozen):   # frozen again before this fit's first batch
                history.frozen_to_restore = left.frozen
            del pl_module.__dict__["on_save_checkpoint"]
            if left.own_hook is not None:
                pl_module.on_save_checkpoint = left.own_hook
        original_load, original_save = pl_module.on_load_checkpoint, pl_module.on_save_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            changelog = (checkpoint.get("revacnn") or {}).get("changelog", [])
            frozen = (checkpoint.get("revacnn") or {}).get("frozen")
            history.frozen_to_restore = frozen if any_frozen(frozen) else None   # the checkpoint's, not a fit's before
            if changelog and not shaped_like(pl_module, checkpoint.get("state_dict") or {}):
                from revacnn.steering import replay_changelog

                replay_changelog(pl_module, changelog)
                rank_zero_info(f"revacnn: replayed {len(changelog)} structural change(s) before loading weights")
            if changelog:   # (a module already steered so, e.g. the same instance fitted again, is not re-steered)
                history.changelog = list(changelog)
            original_load(checkpoint)
            if changelog:   # weights that still do not fit: said here, not as load_state_dict's list of keys
                from revacnn.steering.changelog import explain_mismatch
                from revacnn.steering.errors import CheckpointMismatch

                problem = explain_mismatch(pl_module, checkpoint.get("state_dict") or {}, changelog,
                                           getattr(pl_module, "strict_loading", True),
                                           f"the {type(pl_module).__name__} being fitted")
                if problem is not None:
                    raise CheckpointMismatch(f"revacnn: {problem}")

        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            save(checkpoint)
            original_save(checkpoint)

        self._instance_hooks = {name: pl_module.__dict__[name] for name in _HOOKS if name in pl_module.__dict__}
        pl_module.on_load_checkpoint = on_load_checkpoint
        pl_module.on_save_checkpoint = on_save_checkpoint
        self._module = pl_module

    def unwrap(self, changelog: list[dict[str, Any]], run_id: str, frozen: dict[str, Any] | None = None) -> None:
        """Put the module's own hooks back, and leave a ``SavesChangelog`` on a module that was steered (its shapes
        changed, or layers are frozen); idempotent."""
        module = self._module
        if module is None:
            return
        for name in _HOOKS:
            module.__dict__.pop(name, None)
        module.__dict__.update(self._instance_hooks)
        if changelog or any_frozen(frozen):
            module.on_save_checkpoint = SavesChangelog(module, list(changelog), run_id,
                                                       self._instance_hooks.get("on_save_checkpoint"), frozen)
        self._module = None
