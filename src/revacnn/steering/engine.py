"""The steering engine: validate a command fully, apply one operation, carry the optimizer over, acknowledge.

``SteeringEngine.apply`` never raises for bad input: it returns an ack with ``ok=False`` and a message, and the
model, optimizers and schedulers are then unchanged (all checks run before the first change; structural operations
additionally run inside a transaction that is rolled back if anything unexpected fails half-way).
"""

from __future__ import annotations

import copy
import math
import random
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from . import commands as C
from .errors import SteeringError
from .freezing import FreezeManager
from .graph import CONVS, Group, eager, trace
from .optimizer import (apply_records, check_supported, insert_params, locate, remove_params, reset_state_rows,
                        set_hparams, validate_hparams)
from .surgery import resize_channels, splice_insert, splice_remove

FILTER_LAYERS = (*CONVS, nn.Linear)  # layers whose filters (neurons) are the rows of their weight
RELU_NODES = {"ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1"}
MAX_COUNT = 4096


class _Transaction:
    """Shallow snapshot of every module's registries and every optimizer's groups and state, for rollback."""

    def __init__(self, module: nn.Module, optimizers) -> None:
        self.mods = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                     for m in module.modules()]
        self.opts = [(o, [list(g["params"]) for g in o.param_groups], dict(o.state)) for o in optimizers]

    def rollback(self) -> None:
        for m, d, params, buffers, modules in self.mods:
            m.__dict__.clear()
            m.__dict__.update(d)
            m._parameters, m._buffers, m._modules = params, buffers, modules
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
        try:
            _, op, args = C.parse_command(command)
            structural, changes, filter_maps = getattr(self, "_op_" + op)(args)
        except SteeringError as exc:
            ack["error"] = str(exc)
            return ack
        except Exception as exc:  # a bug, not bad input: still an ack, never an exception into the training loop
            ack["error"] = f"internal error while applying {ack['op']}: {type(exc).__name__}: {exc}"
            return ack
        ack.update(ok=True, structural=structural, changes=_plain(changes), filter_maps=_plain(filter_maps))
        return ack

    # ----------------------------------------------------------------------------------------------- helpers
    def _layer(self, name: str, op: str, kind: type | tuple | None = None, what: str = "") -> nn.Module:
        try:
            mod = self.module.get_submodule(name)
        except AttributeError:
            layers = [n for n, m in self.module.named_modules() if isinstance(m, FILTER_LAYERS)]
            raise SteeringError(f"{op}: unknown layer {name!r}; conv and Linear layers are: {', '.join(layers)}"
                                ) from None
        if kind is not None and not isinstance(mod, kind):
            raise SteeringError(f"{op}: layer {name!r} is a {type(mod).__name__}; {what or 'unsupported layer type'}")
        return mod

    def _filter_layer(self, name: str, op: str) -> nn.Module:
        """The layer ``name`` if its filters are the rows of its weight: a Conv1d/2d/3d (filters) or a Linear
        (neurons); not a transposed conv, whose weight holds its filters on dim 1."""
        return self._layer(name, op, FILTER_LAYERS, f"{op} needs a conv (1-D, 2-D or 3-D) or Linear layer")

    def _check_held_weights(self, name: str, op: str) -> None:
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

    def _trace(self, op: str):
        x = self._input()
        if x is None:
            raise SteeringError(f"{op}: the engine has no example_input to trace layer couplings with")
        return trace(self.module, x)

    def _outputs(self):
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
    def _delta(before, after):
        if before is None or after is None or len(before) != len(after):
            return None
        worst = 0.0
        for a, b in zip(before, after):
            if a.shape != b.shape:
                return None
            worst = max(worst, (a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
        return worst

    def _structural(self, op: str, body):
        """Measure outputs, run ``body`` in a transaction, reset torch.compile caches, measure again."""
        before = self._outputs()
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
            after = self._outputs()
        except Exception as exc:  # a coupling the checks did not see: undo, so the model still runs
            txn.rollback()
            if compiled:
                torch.compiler.reset()
            raise SteeringError(f"{op}: the model's forward failed after the change ({type(exc).__name__}: {exc}); "
                                "the change was undone") from exc
        return result, self._delta(before, after), compiled

    def _group(self, name: str, op: str) -> Group:
        layer = self._filter_layer(name, op)
        check_supported(self.optimizers, f"{op} {name}")
        if getattr(layer, "groups", 1) != 1:
            raise SteeringError(f"{op}: {name} is a grouped/depthwise conv (groups={layer.groups}); unsupported")
        t = self._trace(op)
        group = t.groups.get(name)
        if group is None:
            raise SteeringError(f"{op}: {name} is not used in forward on the example input")
        group.check(f"{op} {name}")
        for member in [*group.producers, *group.batchnorms, *(reader for reader, _ in group.readers)]:
            self._check_held_weights(member, op)
        if not group.readers:
            raise SteeringError(f"{op}: no layer reads the output of {name}; cannot change its channels")
        for b in group.batchnorms:
            bn = self.module.get_submodule(b)
            if bn.num_features != group.channels:
                raise SteeringError(f"{op}: BatchNorm {b} has {bn.num_features} features, expected {group.channels}")
        return group

    def _resize(self, op: str, name: str, group: Group, plan: dict, kept: list[int], added: int, fill=None):
        def body():
            records = resize_channels(self.module, plan)
            if fill is not None:
                fill()
            apply_records(self.optimizers, records)
            return records

        _, delta, compiled = self._structural(op, body)
        for p in group.producers:
            self.freezer.remap(self.module.get_submodule(p), kept)
        entry = {k: v for k, v in plan.items()}
        self.changelog.append(copy.deepcopy(entry))
        maps = {n: {"kept": list(kept), "added": added} for n in group.producers + group.batchnorms}
        changes = {"layer": name, "group": list(group.producers), "batchnorms": list(group.batchnorms),
                   "readers": [r for r, _ in group.readers], "channels": [group.channels, len(kept) + added],
                   "output_max_abs_change": delta, "compiler_reset": compiled}
        return changes, maps

    # ----------------------------------------------------------------------------------------------- freeze
    def _freeze_targets(self, args: dict, op: str):
        if "layers" in args:
            if "layer" in args or "filters" in args:
                raise SteeringError(f"{op}: give either 'layers' or 'layer' with 'filters', not both")
            names = C.get_name_list(args, "layers", op)
            mods = []
            for n in names:
                mod = self._layer(n, op)
                if not any(True for _ in mod.parameters()):
                    raise SteeringError(f"{op}: layer {n!r} ({type(mod).__name__}) has no parameters")
                mods.append((n, mod))
            return mods, None
        if "layer" not in args or "filters" not in args:
            raise SteeringError(f"{op}: needs 'layers' (a list of names) or 'layer' with 'filters'")
        name = C.get_str(args, "layer", op)
        layer = self._layer(name, op, FILTER_LAYERS,
                            "single filters can be (un)frozen only in a conv (1-D, 2-D or 3-D) or Linear layer")
        self._check_held_weights(name, op)
        filters = C.get_int_list(args, "filters", op, upper=layer.weight.shape[0], what="filter")
        return [(name, layer)], filters

    def _op_freeze(self, args):
        mods, filters = self._freeze_targets(args, "freeze")
        if filters is None:
            for _, mod in mods:
                self.freezer.freeze_layer(mod)
        else:
            self.freezer.freeze_filters(mods[0][1], filters)
        return False, {"frozen": self.frozen(), "mode": "grad_none" if self.distributed else "requires_grad"}, {}

    def _op_unfreeze(self, args):
        mods, filters = self._freeze_targets(args, "unfreeze")
        not_frozen, by_module = [], []
        if filters is None:
            by_module = [(n, mod) for n, mod in mods if self._frozen_by_module(n, mod)]  # checked before any change
            for n, mod in mods:
                if (n, mod) in by_module:
                    for param in mod.parameters():
                        param.requires_grad_(True)
                elif not self.freezer.unfreeze_layer(mod) and mod not in self.freezer.filters:
                    not_frozen.append(n)
                self.freezer.filters.pop(mod, None)
        else:
            removed = self.freezer.unfreeze_filters(mods[0][1], filters)
            not_frozen = [f for f in filters if f not in removed]
        return False, {"frozen": self.frozen(), "were_not_frozen": not_frozen,
                       "were_frozen_by_the_module": [n for n, _ in by_module]}, {}

    def _frozen_by_module(self, name: str, mod: nn.Module) -> bool:
        """Whether ``mod`` was frozen by the user's own code (no parameter requires a gradient, and not by a
        ``freeze``), e.g. a fine-tuning backbone; raises if unfreezing it would not make it train."""
        params = list(mod.parameters())
        if mod in self.freezer.layers or any(p.requires_grad for p in params):
            return False
        if self.distributed:
            raise SteeringError(f"unfreeze: {name} was frozen by the module (requires_grad=False) before DDP wrapped "
                                "it; DDP synchronises only the parameters that required a gradient then, so it "
                                "cannot be unfrozen during this run")
        outside = [p for p in params if locate(self.optimizers, p) is None]
        if outside:
            raise SteeringError(f"unfreeze: {name} was frozen by the module (requires_grad=False) and "
                                f"{len(outside)} of its {len(params)} parameters are in no optimizer (configure_"
                                "optimizers left them out), so unfreezing it would not train it")
        return True

    # ----------------------------------------------------------------------------------------------- hparams
    def _op_set_hparams(self, args):
        op = "set_hparams"
        values = {}
        for key in ("lr", "momentum", "weight_decay"):
            if key in args:
                values[key] = C.get_float(args, key, op, minimum=0.0)
        if not values:
            raise SteeringError("set_hparams: give at least one of lr, momentum, weight_decay")
        groups = C.get_int_list(args, "groups", op, what="param group") if "groups" in args else None
        validate_hparams(self.optimizers, self.schedulers, values, groups)
        return False, set_hparams(self.optimizers, self.schedulers, values, groups), {}

    # ----------------------------------------------------------------------------------------------- widen
    def _op_widen(self, args):
        op = "widen"
        name = C.get_str(args, "layer", op)
        count = C.get_int(args, "count", op, minimum=1)
        if count > MAX_COUNT:
            raise SteeringError(f"widen: count {count} is larger than the limit {MAX_COUNT}")
        init = C.get_choice(args, "init", op, ("net2net", "random"))
        split = C.get_choice(args, "split", op, ("uneven", "even"))
        seed = C.get_int(args, "seed", op, default=0)
        group = self._group(name, op)
        width = group.channels
        rng = random.Random(seed)
        sources = [rng.randrange(width) for _ in range(count)]
        index = list(range(width)) + sources
        copies: dict[int, list[int]] = {}
        for j, s in enumerate(index):
            copies.setdefault(s, []).append(j)
        share = [1.0] * len(index)
        if init == "net2net":
            for s, js in copies.items():
                if len(js) == 1:
                    continue
                if split == "even":
                    w = [1.0] * len(js)
                else:
                    w = [rng.uniform(0.5, 1.5) for _ in js]
                total = sum(w)
                for j, wj in zip(js, w):
                    share[j] = wj / total
        state_scale = [1.0 if j < width else share[j] / share[index[j]] for j in range(len(index))]
        plan = {"op": "widen", "layer": name, "init": init, "split": split, "seed": seed,
                "producers": list(group.producers), "batchnorms": list(group.batchnorms),
                "readers": [[r, hw] for r, hw in group.readers], "index": index,
                "in_scale": share if init == "net2net" else None, "state_scale": state_scale}

        def fill():  # the paper's init: new filters and their reader slices from U(-0.2, 0.2)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in plan["producers"]:
                    mod = self.module.get_submodule(p)
                    for t in (mod.weight, mod.bias):
                        if t is not None:
                            t[width:] = (torch.rand(t[width:].shape, generator=gen) * 0.4 - 0.2).to(t)
                for r, hw in plan["readers"]:
                    w = self.module.get_submodule(r).weight
                    lo = width * (hw or 1)
                    w[:, lo:] = (torch.rand(w[:, lo:].shape, generator=gen) * 0.4 - 0.2).to(w)

        changes, maps = self._resize(op, name, group, plan, list(range(width)), count,
                                     fill if init == "random" else None)
        changes.update(sources=sources, init=init, split=split, function_preserving=init == "net2net")
        return True, changes, maps

    # ----------------------------------------------------------------------------------------------- remove filters
    def _op_remove_filters(self, args):
        op = "remove_filters"
        name = C.get_str(args, "layer", op)
        width = self._filter_layer(name, op).weight.shape[0]
        filters = C.get_int_list(args, "filters", op, upper=width, what="filter")
        if len(filters) >= width:
            raise SteeringError(f"remove_filters: cannot remove all {width} filters of {name}")
        group = self._group(name, op)
        kept = [i for i in range(group.channels) if i not in set(filters)]
        plan = {"op": "remove_filters", "layer": name, "filters": sorted(filters),
                "producers": list(group.producers), "batchnorms": list(group.batchnorms),
                "readers": [[r, hw] for r, hw in group.readers], "index": kept, "in_scale": None,
                "state_scale": None}
        changes, maps = self._resize(op, name, group, plan, kept, 0)
        changes.update(removed=sorted(filters), function_preserving=False)
        return True, changes, maps

    # ----------------------------------------------------------------------------------------------- insert / remove layer
    def _op_insert_layer(self, args):
        op = "insert_layer"
        name = C.get_str(args, "after", op)
        batchnorm = C.get_bool(args, "batchnorm", op, False)
        conv = self._layer(name, op, CONVS, "insert_layer needs a conv layer (1-D, 2-D or 3-D)")
        check_supported(self.optimizers, f"{op} after {name}")
        if conv.groups != 1:
            raise SteeringError(f"insert_layer: {name} is a grouped/depthwise conv (groups={conv.groups}); unsupported")
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise SteeringError(f"insert_layer: {name} has an even kernel {conv.kernel_size}; an identity conv of "
                                "that size has no centre tap")
        t = self._trace(op)
        if t.calls.get(name, 0) != 1:
            raise SteeringError(f"insert_layer: {name} is called {t.calls.get(name, 0)} times in forward; need once")
        anchor, relu = name, False
        fmods = t.follower_modules.get(name, [])
        if len(t.followers.get(name, [])) == 1 and t.followers[name][0] in RELU_NODES:
            relu = True
        elif len(t.followers.get(name, [])) == 1 and len(fmods) == 1 and \
                isinstance(self.module.get_submodule(fmods[0]), _BatchNorm) and t.calls.get(fmods[0]) == 1 and \
                len(t.followers.get(fmods[0], [])) == 1 and t.followers[fmods[0]][0] in RELU_NODES:
            anchor, relu = fmods[0], True
        entry = {"op": "insert_layer", "anchor": anchor, "like": name, "relu": relu, "batchnorm": batchnorm}

        def body():
            seq = splice_insert(self.module, entry)
            new = [p for m in list(seq)[1:] for p in m.parameters()]
            insert_params(self.optimizers, self.module, new)
            return seq

        seq, delta, compiled = self._structural(op, body)
        self.changelog.append(dict(entry))
        inserted = [f"{anchor}.{i}" for i, m in enumerate(seq) if i > 0 and any(True for _ in m.parameters())]
        changes = {"after": name, "anchor": anchor, "renamed": {anchor: anchor + ".0"}, "inserted": inserted,
                   "placement": "after the ReLU that follows" if relu else "directly after the conv (linear)",
                   "function_preserving_eval": True, "output_max_abs_change": delta, "compiler_reset": compiled}
        return True, changes, {}

    def _op_remove_layer(self, args):
        op = "remove_layer"
        name = C.get_str(args, "layer", op)
        mod = self._layer(name, op, (*CONVS, _BatchNorm),
                          "remove_layer supports conv (1-D, 2-D or 3-D) and BatchNorm layers")
        if isinstance(mod, CONVS):
            if mod.groups != 1:
                raise SteeringError(f"remove_layer: {name} is a grouped/depthwise conv (groups={mod.groups}); only an "
                                    "ungrouped layer with in == out channels can be removed")
            if mod.in_channels != mod.out_channels:
                raise SteeringError(f"remove_layer: {name} maps {mod.in_channels} to {mod.out_channels} channels; "
                                    "only a layer with in == out channels can be removed")
            t = self._trace(op)
            if t.calls.get(name, 0) != 1:
                raise SteeringError(f"remove_layer: {name} is called {t.calls.get(name, 0)} times in forward")
            if t.in_shape[name] != t.out_shape[name]:
                raise SteeringError(f"remove_layer: {name} changes the feature map shape {list(t.in_shape[name])} → "
                                    f"{list(t.out_shape[name])}; only shape-preserving layers can be removed")

        def body():
            old = splice_remove(self.module, name)
            remove_params(self.optimizers, list(old.parameters()))
            return old

        old, delta, compiled = self._structural(op, body)
        for m in old.modules():
            self.freezer.forget(m)
        self.changelog.append({"op": "remove_layer", "layer": name})
        return True, {"layer": name, "removed": type(old).__name__, "output_max_abs_change": delta,
                      "function_preserving": False, "compiler_reset": compiled}, {}

    # ----------------------------------------------------------------------------------------------- reinit
    def _op_reinit_filters(self, args):
        op = "reinit_filters"
        name = C.get_str(args, "layer", op)
        layer = self._filter_layer(name, op)
        self._check_held_weights(name, op)
        filters = C.get_int_list(args, "filters", op, upper=layer.weight.shape[0], what="filter")
        mode = C.get_choice(args, "mode", op, ("neighbours", "values", "random"))
        allowed = {"neighbours": {"neighbours", "distances"}, "values": {"values"}, "random": {"seed"}}[mode]
        extra = sorted({"neighbours", "distances", "values", "seed"} & set(args) - allowed)
        if extra:
            raise SteeringError(f"reinit_filters: field(s) {', '.join(extra)} do not apply to mode {mode!r}")
        w = layer.weight
        shape = tuple(w.shape[1:])
        parts = "in_features" if isinstance(layer, nn.Linear) else "in_channels × kernel size"
        new_w, new_b = [], []
        if mode == "neighbours":
            if "neighbours" not in args or "distances" not in args:
                raise SteeringError("reinit_filters: mode 'neighbours' needs 'neighbours' and 'distances'")
            nbrs = C.get_int_list(args, "neighbours", op, upper=layer.weight.shape[0], what="neighbour filter")
            dists = args["distances"]
            if not isinstance(dists, (list, tuple)) or len(dists) != len(nbrs):
                raise SteeringError(f"reinit_filters: 'distances' must be a list of {len(nbrs)} numbers, one per "
                                    f"neighbour")
            weights = [C.get_float({"d": d}, "d", op + " distance", minimum=0.0, strict=True) for d in dists]
            inv = torch.tensor([1.0 / d for d in weights], dtype=torch.float64)
            inv = inv / inv.sum()
            idx = torch.as_tensor(nbrs, device=w.device)
            avg_w = (w.detach().index_select(0, idx).double() * inv.to(w.device).view(-1, *[1] * len(shape))).sum(0).to(w)
            avg_b = None
            if layer.bias is not None:
                avg_b = (layer.bias.detach().index_select(0, idx).double() * inv.to(w.device)).sum().to(w)
            new_w = [avg_w] * len(filters)
            new_b = [avg_b] * len(filters)
        elif mode == "values":
            if "values" not in args:
                raise SteeringError("reinit_filters: mode 'values' needs 'values'")
            values = args["values"]
            if not isinstance(values, (list, tuple)) or len(values) != len(filters):
                raise SteeringError(f"reinit_filters: 'values' must be a list of {len(filters)} filter(s), each "
                                    f"shaped {list(shape)}")
            for v in values:
                try:
                    tv = torch.tensor(v, dtype=torch.float64)
                except (TypeError, ValueError) as exc:
                    raise SteeringError(f"reinit_filters: a filter in 'values' is not a nested list of numbers "
                                        f"({exc})") from None
                if tuple(tv.shape) != shape:
                    raise SteeringError(f"reinit_filters: a filter in 'values' has shape {list(tv.shape)}, "
                                        f"expected {list(shape)} ({parts})")
                if not torch.isfinite(tv).all():
                    raise SteeringError("reinit_filters: 'values' contains NaN or infinity")
                new_w.append(tv.to(w))
                new_b.append(None)
        else:
            seed = C.get_int(args, "seed", op, default=0)
            gen = torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(max(1, w[0].numel()))  # PyTorch's default init range of conv and Linear weights
            for _ in filters:
                new_w.append((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(w))
                new_b.append(None if layer.bias is None else
                             (torch.rand((), generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(w))
        before = self._outputs()
        with torch.no_grad():
            for f, nw, nb in zip(filters, new_w, new_b):
                layer.weight[f] = nw
                if nb is not None:
                    layer.bias[f] = nb
        reset_state_rows(self.optimizers, layer.weight, filters)
        if layer.bias is not None:
            reset_state_rows(self.optimizers, layer.bias, filters)
        delta = self._delta(before, self._outputs())
        return False, {"layer": name, "filters": filters, "mode": mode, "output_max_abs_change": delta}, {}
