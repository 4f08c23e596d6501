"""Restore points: the whole trainable state of a run at one moment, put back bitwise whatever changed it since.

A restore point does not invert operations: it keeps, for every module of the model, the module object itself, its
plain attributes (``in_channels``, ``num_features``, …), its ``_modules`` mapping and copies of its parameters and
buffers. Restoring puts that same module tree back (a layer ``remove_layer`` took out, with the object it was; a layer
``insert_layer`` put in is dropped with its parent's mapping) with new ``Parameter`` objects holding the saved
values, then points every optimizer's param groups at them and loads the optimizer state exactly as
``optimizer.state_dict()`` had it, and the schedulers' state as theirs had it. So an operation added or changed
later is undone with no code of its own here.

Tensors are copied to host memory (``tensors``, flat, named ``t0``, ``t1``, …: the layout ``restore_store`` writes
to safetensors when it spills a point to disk); everything else stays in plain Python objects.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .insertion import sync_insertion_hook

#: Attribute values a restore point keeps per module (the ones structural operations change: channel counts,
#: feature counts, kernel sizes, flags); objects (hooks, the trainer) are left as they are.
_PLAIN = (int, float, bool, str, type(None))
_REGISTRIES = ("_parameters", "_buffers", "_modules")


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


@dataclass
class _ModuleState:
    module: nn.Module
    attrs: dict[str, Any] | None                # plain attributes; None for the root (Lightning's own live there)
    params: dict[str, tuple[str, bool] | None]  # name -> (tensor key, requires_grad) or None
    buffers: dict[str, str | None]              # name -> tensor key or None
    modules: dict[str, nn.Module | None]


@dataclass
class _TensorRef:
    """A tensor of an optimizer's or scheduler's state, kept in the point's flat ``tensors``."""
    key: str


@dataclass
class RestorePoint:
    """One restore point; ``tensors`` is None while the point lives in ``file`` (spilled)."""
    id: int
    step: int
    epoch: int
    kind: str                                  # "command" (taken before one) | "periodic" | "start"
    command: dict[str, Any] | None             # {"id", "op", "args"} of the command it was taken before
    modules: list[_ModuleState]
    devices: dict[str, tuple[torch.device, tuple[int, ...]]]   # key -> where the tensor lived, its strides
    optimizers: list[tuple[list[tuple[str, Any]], dict[str, Any]]]  # (group param refs, state_dict with refs)
    schedulers: list[dict[str, Any]]
    rng: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)        # the callback's: change log, filter ids, …
    objects: dict[str, Any] = field(default_factory=dict)      # the callback's, by object: frozen modules
    tensors: dict[str, torch.Tensor] | None = None
    file: str | None = None
    nbytes: int = 0
    ancestors: list[int] = field(default_factory=list)         # the points before it on its path (``history``)
    branch: int = 0
    ready: Any = None                                           # a CUDA event: the host copies are complete

    def wait(self) -> None:
        """Wait until the host copies of a point taken on a GPU are complete (before reading ``tensors``)."""
        if self.ready is not None:
            self.ready.synchronize()

    def summary(self) -> dict[str, Any]:
        """Plain-typed description for acks and the ``restore_points`` listing."""
        return {"id": self.id, "step": self.step, "epoch": self.epoch, "kind": self.kind, "branch": self.branch,
                "command": dict(self.command) if self.command else None, "bytes": self.nbytes,
                "on_disk": self.tensors is None}


class _Tensors:
    """Collects host copies of tensors under flat keys while a point is captured."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.devices: dict[str, tuple[torch.device, tuple[int, ...]]] = {}
        self._by_id: dict[int, str] = {}

    def add(self, tensor: torch.Tensor) -> str:
        known = self._by_id.get(id(tensor))
        if known is not None:  # a tied weight (one Parameter in two modules) stays one tensor
            return known
        key = f"t{len(self.tensors)}"
        data = tensor.detach()
        # contiguous on the host: safetensors writes only contiguous, unshared tensors; the strides come back on
        # restore. On a GPU the copy is queued on the stream (pinned memory), not waited for here.
        if data.device.type == "cpu":
            host = data.contiguous().clone()
        else:
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=torch.cuda.is_available())
            host.copy_(data.contiguous(), non_blocking=True)
        self.tensors[key] = host
        self.devices[key] = (data.device, tuple(data.stride()))
        self._by_id[id(tensor)] = key
        return key


def _refs(value: Any, tensors: _Tensors) -> Any:
    """``value`` with every tensor replaced by a ``_TensorRef`` to its host copy; other values deep-copied."""
    if isinstance(value, torch.Tensor):
        return _TensorRef(tensors.add(value))
    if isinstance(value, dict):
        return {k: _refs(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_refs(v, tensors) for v in value]
    if isinstance(value, tuple):
        return tuple(_refs(v, tensors) for v in value)
    return copy.deepcopy(value)


def _materialize(value: Any, load) -> Any:
    if isinstance(value, _TensorRef):
        return load(value.key)
    if isinstance(value, dict):
        return {k: _materialize(v, load) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v, load) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialize(v, load) for v in value)
    return copy.deepcopy(value)


def rng_states() -> dict[str, Any]:
    """The random generators' states: torch (CPU and every initialised CUDA device), numpy, Python."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def capture(point_id: int, step: int, epoch: int, kind: str, model: nn.Module, optimizers, schedulers,
            command: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> RestorePoint:
    """Take a restore point of ``model``, its ``optimizers`` and ``schedulers`` (and the RNG states).

    Preserves (for ``restore``): the module tree, every module's plain attributes, parameters (values, dtype,
    strides, device, requires_grad, ties), buffers, the optimizers' ``state_dict()`` and param groups, the
    schedulers' ``state_dict()``. ``extra`` is deep-copied as it is.
    """
    tensors = _Tensors()
    states = []
    root = model
    for _, mod in model.named_modules(remove_duplicate=True):
        params = {name: None if p is None else (tensors.add(p), p.requires_grad)
                  for name, p in mod._parameters.items()}
        buffers = {name: None if b is None else tensors.add(b) for name, b in mod._buffers.items()}
        attrs = None if mod is root else {k: copy.copy(v) for k, v in mod.__dict__.items()
                                        if k not in _REGISTRIES and _is_plain(v)}
        states.append(_ModuleState(mod, attrs, params, buffers, dict(mod._modules)))
    owned = {id(p) for p in model.parameters()}
    optimizer_states = []
    for opt in optimizers:
        groups = [[("model", tensors.add(p)) if id(p) in owned else ("other", p) for p in g["params"]]
                  for g in opt.param_groups]
        optimizer_states.append((groups, _refs(opt.state_dict(), tensors)))
    scheduler_states = [_refs(s.state_dict(), tensors) for s in schedulers]
    ready = None
    if any(device.type == "cuda" for device, _ in tensors.devices.values()):
        ready = torch.cuda.Event()   # the copies finish on the stream: waited for when read, not here
        ready.record()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.tensors.values())
    return RestorePoint(point_id, step, epoch, kind, copy.deepcopy(command), states, tensors.devices,
                        optimizer_states, scheduler_states, rng_states(), extra=copy.deepcopy(extra or {}),
                        tensors=tensors.tensors, nbytes=nbytes, ready=ready)


def restore(point: RestorePoint, tensors: dict[str, torch.Tensor], model: nn.Module, optimizers,
            schedulers) -> None:
    """Put ``model``, ``optimizers``, ``schedulers`` and the RNG states back as ``capture`` found them.

    ``tensors`` are the point's host copies (``point.tensors``, or read back from its file); they are copied again
    here, so the point can be restored any number of times. The optimizers and schedulers must be the objects the
    point was taken of (their ``param_groups`` count unchanged: operations never add groups).
    """
    made: dict[str, torch.Tensor] = {}
    point.wait()

    def load(key: str) -> torch.Tensor:
        device, stride = point.devices[key]
        saved = tensors[key]
        out = torch.empty_strided(saved.shape, stride, dtype=saved.dtype, device=device)
        out.copy_(saved)
        return out

    def parameter(key: str, requires_grad: bool) -> nn.Parameter:
        if key not in made:
            made[key] = nn.Parameter(load(key), requires_grad=requires_grad)
        return made[key]

    with torch.no_grad():
        for state in point.modules:
            mod = state.module
            if state.attrs is not None:
                for name in [k for k, v in mod.__dict__.items() if k not in _REGISTRIES and _is_plain(v)
                             and k not in state.attrs]:
                    del mod.__dict__[name]   # a plain attribute an operation added since
                mod.__dict__.update({k: copy.copy(v) for k, v in state.attrs.items()})
            mod._parameters = {name: None if ref is None else parameter(*ref) for name, ref in state.params.items()}
            mod._buffers = {name: None if key is None else made.setdefault(key, load(key))
                            for name, key in state.buffers.items()}
            mod._modules = dict(state.modules)
            sync_insertion_hook(mod)
        for opt, (groups, saved) in zip(optimizers, point.optimizers):
            if len(groups) != len(opt.param_groups):
                raise RuntimeError(f"{type(opt).__name__} has {len(opt.param_groups)} param groups; the restore "
                                   f"point was taken with {len(groups)}")
            for group, refs in zip(opt.param_groups, groups):
                group["params"] = [made[ref] if kind == "model" else ref for kind, ref in refs]
            opt.state.clear()
            opt.load_state_dict(_materialize(saved, load))
        for sched, saved in zip(schedulers, point.schedulers):
            sched.load_state_dict(_materialize(saved, load))
    set_rng_states(point.rng)
