"""The one traced forward pass that telemetry's ``structure`` message and steering's coupling analysis both read.

One eval-mode forward with autograd on (the input is made ``requires_grad``, so every op records a node even where
layers are frozen), with forward hooks on the modules asked for: per module how often it ran, and for its first
call the autograd nodes of its tensor inputs and output and their shapes. Training flags are restored; BatchNorm
statistics are not touched (eval mode). Functional ops in ``forward`` (``F.relu``, ``torch.flatten``, residual
``+``) appear in the autograd graph, so no change to the user's model is needed. Compiled modules run eagerly
(``eager``) so the graph shows the real ops.

``record`` can hand its forward to another tracer: Torch-Pruning's ``DependencyGraph`` (steering/graph.py) is
built from the same forward, through its ``forward_fn``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

INPUT = "input"  # stands for the traced input among a module's input nodes


def eager():
    """Run compiled modules eagerly (so the autograd graph shows the real ops), if dynamo is in use."""
    if "torch._dynamo" in sys.modules and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


@dataclass
class ForwardRecord:
    """What one hooked forward saw. Nodes are ``grad_fn`` objects; ``keep`` holds them so their ids stay unique."""

    x: torch.Tensor                                                 # the traced input (requires_grad when float)
    outputs: list[torch.Tensor] = field(default_factory=list)       # the model's tensor outputs
    order: list[str] = field(default_factory=list)                  # hooked modules in the order of first call
    calls: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, list[Any]] = field(default_factory=dict)      # first call: input nodes, INPUT for x itself
    output_node: dict[str, Any] = field(default_factory=dict)       # first call: the output's grad_fn
    in_shape: dict[str, tuple] = field(default_factory=dict)        # first call: the first tensor input's shape
    out_shape: dict[str, tuple] = field(default_factory=dict)
    passes_through: set[str] = field(default_factory=set)           # returned one of its inputs (nn.Identity)
    keep: list[Any] = field(default_factory=list)

    def users(self) -> dict[int, list[Any]]:
        """Per node id, the nodes that use its output, over the whole graph behind the outputs."""
        stack = [o.grad_fn for o in self.outputs if o.grad_fn is not None]
        seen: set[int] = set()
        users: dict[int, list[Any]] = {}
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            self.keep.append(node)
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    users.setdefault(id(nxt), []).append(node)
                    stack.append(nxt)
        return users


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [t for t in (getattr(value, k, None) for k in ("logits", "last_hidden_state")) if t is not None]


def _hook(rec: ForwardRecord, name: str):
    def record(_module, inputs, output):
        rec.calls[name] = rec.calls.get(name, 0) + 1
        if name in rec.output_node or name in rec.passes_through or not isinstance(output, torch.Tensor):
            return
        rec.order.append(name)
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        rec.inputs[name] = [INPUT if t is rec.x else t.grad_fn for t in tensors if t is rec.x or t.grad_fn]
        rec.keep.extend(rec.inputs[name])
        if tensors:
            rec.in_shape[name] = tuple(tensors[0].shape)
        rec.out_shape[name] = tuple(output.shape)
        if any(output is t for t in tensors):  # nn.Identity & co. produce nothing new
            rec.passes_through.add(name)
        elif output.grad_fn is not None:
            rec.output_node[name] = output.grad_fn
            rec.keep.append(output.grad_fn)
    return record


def traced_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` detached, on the module's device, ``requires_grad`` when floating point."""
    param = next(module.parameters(), None)
    x = x.detach()
    if param is not None:
        x = x.to(param.device)
    return x.clone().requires_grad_(x.is_floating_point())


def record(module: nn.Module, x: torch.Tensor, names: Iterable[str],
           run: Callable[[Callable[[], Any]], Any] | None = None) -> ForwardRecord:
    """One eval-mode forward of ``module`` on ``x`` (``traced_input``) with hooks on the modules ``names``.

    ``run``, if given, is called with the forward (a function of no arguments returning the output) and must call
    it once; it lets another tracer wrap the same forward.
    """
    rec = ForwardRecord(x=traced_input(module, x))
    wanted = set(names)
    handles = [sub.register_forward_hook(_hook(rec, name), prepend=True) for name, sub in module.named_modules() if name in wanted]
    modes = [(sub, sub.training) for sub in module.modules()]

    def forward():
        return module(rec.x)

    try:
        module.eval()
        with torch.enable_grad(), eager():
            output = run(forward) if run is not None else forward()
    finally:
        for handle in handles:
            handle.remove()
        for sub, mode in modes:
            sub.training = mode
    rec.outputs = [t for t in _tensors(output) if t.grad_fn is not None]
    rec.keep.extend(t.grad_fn for t in rec.outputs)
    return rec
