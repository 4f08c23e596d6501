"""Freezing whole layers or single conv filters without touching the training loop.

- Whole layer, single device: ``requires_grad=False`` (no backward compute for it) and ``grad=None``; SGD, Adam,
  AdamW and RMSprop skip a parameter whose ``.grad is None``, so weight and optimizer state stay bitwise unchanged.
- Whole layer, distributed: ``requires_grad`` is never touched (DDP registered its hooks at wrap time); an optimizer
  step pre-hook sets ``grad=None`` instead, and again once a ``step(closure)``'s closure (Lightning's) has run
  backward.
- Single filters: a step pre-hook saves the filter rows of the parameter and of every per-parameter state tensor; the
  post-hook writes them back (zero when the state did not exist yet), so those rows are bitwise unchanged.

Frozen layers are keyed by module object, so they follow renames and parameter replacement (widen). A layer's
parameters are its own (``insertion.own_named_parameters``): not those of the layers insert_layer put after it.
"""

from __future__ import annotations

import torch
from torch import nn

from .insertion import own_named_parameters


class FreezeManager:
    def __init__(self, module: nn.Module, optimizers, distributed: bool) -> None:
        self.module = module
        self.optimizers = list(optimizers)
        self.distributed = distributed
        self.layers: dict[nn.Module, dict[str, bool]] = {}   # module -> {param attr: original requires_grad}
        self.filters: dict[nn.Module, set[int]] = {}
        self._saved: list = []
        self._rows: dict[tuple[nn.Module, torch.device], torch.Tensor] = {}  # index tensors, made once per change
        self._handles = []
        for opt in self.optimizers:
            self._handles.append(opt.register_step_pre_hook(self._pre))
            self._handles.append(opt.register_step_post_hook(self._post))

    # ------------------------------------------------------------------ state
    def frozen(self) -> dict:
        names = {m: n for n, m in self.module.named_modules()}
        out: dict = {}
        for mod, idx in self.filters.items():
            if mod in names and idx:
                out[names[mod]] = sorted(idx)
        for mod in self.layers:
            if mod in names:
                out[names[mod]] = "all"
        return out

    def state(self) -> dict:
        """What is frozen, by layer name, in plain types (for checkpoints): ``{"layers": {name: {parameter:
        requires_grad before the freeze}}, "filters": {name: [filter indices]}}``."""
        names = {m: n for n, m in self.module.named_modules()}
        return {"layers": {names[m]: dict(flags) for m, flags in self.layers.items() if m in names},
                "filters": {names[m]: sorted(idx) for m, idx in self.filters.items() if m in names and idx}}

    def load_state(self, state: dict) -> list[str]:
        """Freeze again what ``state`` (from ``state()``) says, e.g. after a checkpoint resumed: whole layers keep
        the ``requires_grad`` they had before their freeze for ``unfreeze`` to put back. Returns what it could not
        freeze again (a layer that is not in the module, filter indices past its filters)."""
        modules = dict(self.module.named_modules())
        skipped = []
        for name, flags in (state.get("layers") or {}).items():
            mod = modules.get(name)
            if mod is None or not own_named_parameters(mod):
                skipped.append(name)
                continue
            self.freeze_layer(mod)
            self.layers[mod] = {n: bool(flags.get(n, True)) for n, _ in own_named_parameters(mod)}
        for name, filters in (state.get("filters") or {}).items():
            mod = modules.get(name)
            weight = getattr(mod, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
                skipped.append(name)
                continue
            rows = [int(i) for i in filters if 0 <= int(i) < weight.shape[0]]
            if len(rows) != len(filters):
                skipped.append(f"{name} filters {sorted(set(filters) - set(rows))}")
            if rows:
                self.freeze_filters(mod, rows)
        return skipped

    def held(self) -> dict:
        """Copies of what is frozen, keyed by module object (for a restore point: the objects come back with it)."""
        return {"layers": {m: dict(flags) for m, flags in self.layers.items()},
                "filters": {m: set(rows) for m, rows in self.filters.items()}}

    def hold(self, held: dict) -> None:
        """Make frozen exactly what ``held()`` returned (a restore point put the parameters' ``requires_grad``
        back itself)."""
        self.layers = {m: dict(flags) for m, flags in held.get("layers", {}).items()}
        self.filters = {m: set(rows) for m, rows in held.get("filters", {}).items()}
        self._rows.clear()

    def freeze_layer(self, mod: nn.Module) -> None:
        if mod in self.layers:
            return
        self.layers[mod] = {n: p.requires_grad for n, p in own_named_parameters(mod)}
        for _, p in own_named_parameters(mod):
            p.grad = None
            if not self.distributed:
                p.requires_grad_(False)

    def unfreeze_layer(self, mod: nn.Module) -> bool:
        flags = self.layers.pop(mod, None)
        if flags is None:
            return False
        for n, p in own_named_parameters(mod):
            p.requires_grad_(flags.get(n, True))
        return True

    def freeze_filters(self, mod: nn.Module, filters) -> None:
        self.filters.setdefault(mod, set()).update(filters)
        self._rows.clear()

    def unfreeze_filters(self, mod: nn.Module, filters) -> list[int]:
        current = self.filters.get(mod, set())
        removed = sorted(current & set(filters))
        current -= set(filters)
        self._rows.clear()
        if not current:
            self.filters.pop(mod, None)
        return removed

    def remap(self, mod: nn.Module, order: list[int | None]) -> None:
        """After a change of ``mod``'s output channels (``order[j]``: the old index of new channel j, None for a new
        one), move filter freezes; new channels are not frozen."""
        if mod not in self.filters:
            return
        old = self.filters.pop(mod)
        self._rows.clear()
        new = {j for j, i in enumerate(order) if i is not None and i in old}
        if new:
            self.filters[mod] = new

    def forget(self, mod: nn.Module) -> None:
        self.layers.pop(mod, None)
        self.filters.pop(mod, None)
        self._rows.clear()

    def _rows_on(self, mod: nn.Module, device: torch.device) -> torch.Tensor:
        """The frozen rows of ``mod`` as an index tensor on ``device``, built once (no copy in the step path)."""
        key = (mod, device)
        if key not in self._rows:
            self._rows[key] = torch.as_tensor(sorted(self.filters[mod]), dtype=torch.long, device=device)
        return self._rows[key]

    # ------------------------------------------------------------------ hooks
    def _params_of(self, mod: nn.Module):
        for attr in ("weight", "bias"):
            p = getattr(mod, attr, None)
            if isinstance(p, nn.Parameter):
                yield p

    def _drop_layer_grads(self) -> None:
        for mod in self.layers:
            for _, p in own_named_parameters(mod):
                p.grad = None

    def _pre(self, optimizer, args, kwargs):
        self._drop_layer_grads()
        self._saved = []
        for mod in self.filters:
            for p in self._params_of(mod):
                # saved even without a gradient yet: Lightning steps with a closure, whose backward runs inside
                # ``step``, after this hook (the first step after a freeze restored on resume has none here)
                r = self._rows_on(mod, p.device)
                state = optimizer.state.get(p)
                saved_state = None
                if state is not None:
                    saved_state = {k: v.index_select(0, r).clone() for k, v in state.items()
                                   if isinstance(v, torch.Tensor) and v.shape == p.shape}
                self._saved.append((p, r, p.detach().index_select(0, r).clone(), saved_state))
        return self._after_closure(args, kwargs)

    def _after_closure(self, args, kwargs):
        """A ``step(closure)`` (Lightning's, LBFGS) runs backward inside ``step``, after this hook: the closure is
        wrapped to drop the frozen layers' gradients once it has made them (under DDP they exist: requires_grad was
        left on). Returns the hook's ``(args, kwargs)``, or None where nothing changes."""
        # ``args`` starts with the optimizer itself (the hook sees ``step``'s own arguments)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None or not self.layers:
            return None

        def without_frozen_grads():
            loss = closure()
            self._drop_layer_grads()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": without_frozen_grads}
        return (args[0], without_frozen_grads, *args[2:]), kwargs

    def _post(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            for p, r, rows, saved_state in self._saved:
                p.index_copy_(0, r, rows)
                state = optimizer.state.get(p, {})
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        if saved_state is not None and k in saved_state:
                            v.index_copy_(0, r, saved_state[k])
                        else:
                            v.index_fill_(0, r, 0)
        self._saved = []

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
