"""The steering engine: validate a command fully, apply one operation, carry the optimizer over, acknowledge.

``SteeringEngine.apply`` never raises for bad input: it returns an ack with ``ok=False`` and a message, and the
model, optimizers and schedulers are then unchanged (all checks run before the first change; structural operations
additionally run inside a transaction that is rolled back if anything unexpected fails half-way, or if the model's
eval output on the example input turns NaN or inf; ``reinit_filters`` restores the rows it rewrote on the same
rule). The operations
themselves live in ``steering/ops/``, one module per family; the engine gives them the model access they share.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import commands as C
from .errors import SteeringError
from .freezing import FreezeManager
from .graph import FILTER_LAYERS, Group, eager, trace
from .names import resolve_layer
from .ops import OPERATIONS
from .optimizer import apply_records, check_supported
from .surgery import resize_channels


class _Transaction:
    """Shallow snapshot of every module's registries (forward hooks included: ``insert_layer`` adds one) and every
    optimizer's groups and state, for rollback."""

    def __init__(self, module: nn.Module, optimizers) -> None:
        self.mods = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules),
                      dict(m._forward_hooks)) for m in module.modules()]
        self.opts = [(o, [list(g["params"]) for g in o.param_groups], dict(o.state)) for o in optimizers]

    def rollback(self) -> None:
        for m, d, params, buffers, modules, hooks in self.mods:
            m.__dict__.clear()
            m.__dict__.update(d)
            m._parameters, m._buffers, m._modules = params, buffers, modules
            m._forward_hooks.clear()  # the same (mutated) dict: hook handles keep pointing at it
            m._forward_hooks.update(hooks)
        for o, groups, state in self.opts:
            for g, params in zip(o.param_groups, groups):
                g["params"] = params
            o.state.clear()
            o.state.update(state)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _plain(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class SteeringEngine:
    """Apply steering commands to ``module`` and its ``optimizers`` (mutated in place) between optimizer steps.

    Layer names are ``module.named_modules()`` names relative to ``module`` (e.g. ``"net.conv2"`` for a
    LightningModule wrapping its network as ``self.net``).
    """

    def __init__(self, module: nn.Module, optimizers, schedulers=(), example_input: torch.Tensor | None = None,
                 distributed: bool = False) -> None:
        self.module = module
        self.optimizers = list(optimizers)
        self.schedulers = list(schedulers)
        self.example_input = example_input
        self.distributed = distributed
        self.changelog: list[dict] = []
        self.resolved: dict[str, str] = {}   # the names of the command being applied that ``resolve`` changed
        self.freezer = FreezeManager(module, self.optimizers, distributed)

    # ----------------------------------------------------------------------------------------------- public API
    def frozen(self) -> dict:
        """``{layer: "all" | [filter indices]}`` for telemetry."""
        return self.freezer.frozen()

    def close(self) -> None:
        """Remove the optimizer step hooks (filter freezing); call before replacing the engine."""
        self.freezer.close()

    def apply(self, command: Any) -> dict:
        """Apply one command ``{"id", "op", "args"}``; return a plain-typed ack (see docs/protocol.md)."""
        ack = {"id": None, "op": None, "ok": False, "error": None, "structural": False, "changes": {},
               "filter_maps": {}}
        if isinstance(command, Mapping):
            ack["id"] = command.get("id") if isinstance(command.get("id"), str) else None
            ack["op"] = command.get("op") if isinstance(command.get("op"), str) else None
        self.resolved = {}
        try:
            _, op, args = C.parse_command(command)
            structural, changes, filter_maps = OPERATIONS[op](self, args)
            if self.resolved:  # say which module the user's name stood for
                changes = {**changes, "resolved": dict(self.resolved)}
        except SteeringError as exc:
            ack["error"] = str(exc)
            return ack
        except Exception as exc:  # a bug, not bad input: still an ack, never an exception into the training loop
            ack["error"] = f"internal error while applying {ack['op']}: {type(exc).__name__}: {exc}"
            return ack
        ack.update(ok=True, structural=structural, changes=_plain(changes), filter_maps=_plain(filter_maps))
        return ack

    # ------------------------------------------------------------- for the operations (steering/ops/): model access
    def resolve(self, name: str, op: str) -> str:
        """The ``named_modules()`` name of the layer the user calls ``name`` (``names.resolve_layer``: the same
        name, or the name with torch.compile's ``_orig_mod`` segments, followed across insert_layer's renames);
        a name it changed is reported in the ack's ``changes.resolved``. Every operation resolves its layer names
        here first."""
        real = resolve_layer(self.module, name, op, self.changelog)
        if real != name:
            self.resolved[name] = real
        return real

    def layer_arg(self, args: dict, key: str, op: str) -> str:
        """The layer named by ``args[key]``, resolved (``resolve``)."""
        return self.resolve(C.get_str(args, key, op), op)

    def layer(self, name: str, op: str, kind: type | tuple | None = None, what: str = "") -> nn.Module:
        """The module of the layer ``name`` (a name ``resolve`` gave), checked to be a ``kind``."""
        mod = self.module.get_submodule(self.resolve(name, op))
        if kind is not None and not isinstance(mod, kind):
            raise SteeringError(f"{op}: layer {name!r} is a {type(mod).__name__}; {what or 'unsupported layer type'}")
        return mod

    def filter_layer(self, name: str, op: str) -> nn.Module:
        """The layer ``name`` if its filters are the rows of its weight: a Conv1d/2d/3d (filters) or a Linear
        (neurons); not a transposed conv, whose weight holds its filters on dim 1."""
        return self.layer(name, op, FILTER_LAYERS, f"{op} needs a conv (1-D, 2-D or 3-D) or Linear layer")

    def check_held_weights(self, name: str, op: str) -> None:
        """Refuse a layer whose weight or bias is computed on each forward (pruning masks, weight_norm,
        spectral_norm, ``torch.nn.utils.parametrize``): resizing or rewriting that tensor changes nothing that
        lasts, and resizing its parts breaks the layer."""
        mod = self.module.get_submodule(name)
        for attr in ("weight", "bias"):
            value = getattr(mod, attr, None)
            if value is None or isinstance(value, nn.Parameter):
                continue
            if parametrize.is_parametrized(mod, attr):
                how = "parametrized (torch.nn.utils.parametrize, e.g. weight_norm)"
            elif hasattr(mod, attr + "_orig"):
                how = f"pruned (torch.nn.utils.prune: {attr}_orig × {attr}_mask)"
            elif hasattr(mod, attr + "_g") or hasattr(mod, attr + "_v"):
                how = f"weight-normalised ({attr}_g, {attr}_v)"
            else:
                how = "computed by a forward hook"
            raise SteeringError(f"{op}: the {attr} of {name} is {how}, not a Parameter this operation can resize "
                                f"or rewrite")

    def _input(self):
        if self.example_input is None:
            return None
        param = next(self.module.parameters(), None)
        x = self.example_input
        return x.to(param.device) if param is not None else x

    def example(self, op: str) -> torch.Tensor:
        """The example input on the model's device; refused (``op`` says for what) without one."""
        x = self._input()
        if x is None:
            raise SteeringError(f"{op}: the engine has no example_input to run the model on")
        return x

    def trace(self, op: str):
        """The couplings of the model's layers, traced on the example input."""
        x = self._input()
        if x is None:
            raise SteeringError(f"{op}: the engine has no example_input to trace layer couplings with")
        return trace(self.module, x)

    def outputs(self):
        """The model's outputs on the example input in eval mode (None without one), to measure a change by."""
        x = self._input()
        if x is None:
            return None
        modes = {m: m.training for m in self.module.modules()}
        try:
            self.module.eval()
            with torch.no_grad(), eager():
                out = self.module(x)
        finally:
            for m, mode in modes.items():
                m.training = mode
        if isinstance(out, torch.Tensor):
            return [out.detach().clone()]
        if isinstance(out, dict):
            out = list(out.values())
        return [o.detach().clone() for o in out if isinstance(o, torch.Tensor)]

    @staticmethod
    def max_abs_change(before, after):
        """The largest absolute change between two ``outputs()`` (None if either is missing or shapes differ);
        ``inf`` where an output became non-finite (or stopped being so): never 0.0 for an output turned NaN."""
        if before is None or after is None or len(before) != len(after):
            return None
        worst = 0.0
        for a, b in zip(before, after):
            if a.shape != b.shape:
                return None
            if not a.numel():
                continue
            a, b = a.double(), b.double()
            finite = a.isfinite() & b.isfinite()
            same = (a == b) | (a.isnan() & b.isnan())  # an output NaN before and after has not changed
            if (~finite & ~same).any():
                return math.inf
            if finite.any():
                worst = max(worst, (a - b).abs()[finite].max().item())
        return worst

    @staticmethod
    def became_non_finite(before, after) -> bool:
        """Whether an output finite in ``before`` is NaN or inf in ``after`` (any output, where shapes differ);
        False without a ``before`` to compare with."""
        if before is None or after is None:
            return False
        if len(before) == len(after) and all(a.shape == b.shape for a, b in zip(before, after)):
            return any(bool((a.isfinite() & ~b.isfinite()).any()) for a, b in zip(before, after))
        return all(bool(a.isfinite().all()) for a in before) and not all(bool(b.isfinite().all()) for b in after)

    @staticmethod
    def non_finite_error(op: str) -> SteeringError:
        return SteeringError(f"{op}: the change made the model's output non-finite (NaN or inf) on the example "
                             "input; the change was undone")

    def structural(self, op: str, body):
        """Measure outputs, run ``body`` in a transaction, reset torch.compile caches, measure again; roll back
        if the forward fails or an output finite before is NaN or inf after."""
        before = self.outputs()
        txn = _Transaction(self.module, self.optimizers)
        try:
            result = body()
        except Exception:
            txn.rollback()
            raise
        compiled = "torch._dynamo" in sys.modules
        if compiled:
            torch.compiler.reset()
        try:
            after = self.outputs()
        except Exception as exc:  # a coupling the checks did not see: undo, so the model still runs
            txn.rollback()
            if compiled:
                torch.compiler.reset()
            raise SteeringError(f"{op}: the model's forward failed after the change ({type(exc).__name__}: {exc}); "
                                "the change was undone") from exc
        if self.became_non_finite(before, after):  # refused like any invalid command: nothing changed
            txn.rollback()
            if compiled:
                torch.compiler.reset()
            raise self.non_finite_error(op)
        return result, self.max_abs_change(before, after), compiled

    def channel_group(self, name: str, op: str) -> Group:
        """The coupled group whose channels change with ``name``'s filters, checked for everything a resize
        needs."""
        self.filter_layer(name, op)
        check_supported(self.optimizers, f"{op} {name}")
        group = self.trace(op).group(name)
        if group is None:
            raise SteeringError(f"{op}: {name} is not used in forward on the example input")
        group.check(f"{op} {name}")
        for member in group.members():
            self.check_held_weights(member, op)
        if not group.readers:
            raise SteeringError(f"{op}: no layer reads the output of {name}; cannot change its channels")
        for b in group.batchnorms:
            bn = self.module.get_submodule(b)
            if bn.num_features != group.channels:
                raise SteeringError(f"{op}: BatchNorm {b} has {bn.num_features} features, expected {group.channels}")
        return group

    def resize(self, op: str, name: str, group: Group, plan: dict, kept: list[int], added: list[int], fill=None):
        """Resize ``group``'s channels by ``plan`` (``surgery.resize_channels``) and carry the optimizer state over,
        in a transaction; ``fill`` then overwrites the new channels. ``kept``: the old channels that stay, in
        order; ``added``: the positions of the new ones (the kept ones fill the others). Returns ``(changes,
        filter_maps)``.

        Preserves: the kept channels' weights and optimizer-state slices, scaled only as ``plan`` says.
        """
        def body():
            records = resize_channels(self.module, plan)
            if fill is not None:
                fill()
            apply_records(self.optimizers, records)
            return records

        _, delta, compiled = self.structural(op, body)
        new = set(added)
        old_at = iter(kept)
        order = [None if j in new else next(old_at) for j in range(len(kept) + len(added))]
        for p in group.producers + group.channelwise:
            self.freezer.remap(self.module.get_submodule(p), order)
        entry = {k: v for k, v in plan.items()}
        self.changelog.append(copy.deepcopy(entry))
        resized = group.producers + group.channelwise + group.batchnorms + group.norms
        maps = {n: {"kept": list(kept), "added": len(added), "added_at": list(added)} for n in resized}
        changes = {"layer": name, "group": list(group.producers), "batchnorms": list(group.batchnorms),
                   "norms": list(group.norms), "channelwise": list(group.channelwise),
                   "grouped": list(group.grouped), "scales": [s for s, _ in group.scales],
                   "readers": [r for r, _, _ in group.readers], "channels": [group.channels, len(kept) + len(added)],
                   "output_max_abs_change": delta, "compiler_reset": compiled}
        return changes, maps
