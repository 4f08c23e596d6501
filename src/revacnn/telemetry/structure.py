"""The model's structure as the protocol's ``structure`` message describes it, traced through autograd.

Edges come from the autograd graph of one forward pass on the probe images, so functional operations in
``forward`` (``F.relu``, ``torch.flatten``, residual ``+``) are seen without changing or scripting the model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from revacnn.telemetry.activations import eval_mode
from revacnn.telemetry.probes import filter_count

_MAX_GRAPH_NODES = 200_000
INPUT = "input"  # the model input, as an edge source


def _pair(value: Any) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def layer_description(name: str, module: nn.Module, output_shape: list[int], filter_ids: list[int],
                      frozen: Any = None) -> dict[str, Any]:
    """One entry of ``structure.layers`` (docs/protocol.md §4)."""
    weight = module.weight
    is_conv = isinstance(module, nn.modules.conv._ConvNd)
    entry = {
        "name": name, "type": type(module).__name__, "kind": "conv" if is_conv else "linear",
        "in": int(module.in_channels if is_conv else weight.shape[1]), "out": filter_count(module),
        "kernel": list(weight.shape[2:]) if is_conv else [],
        "stride": _pair(module.stride) if is_conv else [], "padding": _pair(module.padding) if is_conv else [],
        "groups": int(module.groups) if is_conv else 1, "bias": getattr(module, "bias", None) is not None,
        "weight_shape": list(weight.shape), "params": sum(p.numel() for p in module.parameters(recurse=False)),
        "output_shape": output_shape, "filter_ids": list(filter_ids), "frozen": frozen,
    }
    return entry


def trace(module: nn.Module, images: torch.Tensor, monitored: Sequence[str]) -> dict[str, Any]:
    """Leaf modules in forward order with output shapes, leaf-module edges, and edges between monitored layers.

    Returns ``{"order": [names of leaf modules and monitored layers as called], "output_shapes": {name: shape
    without batch}, "modules": [...], "edges": [...], "layer_edges": [...]}``. Runs one forward in eval mode.
    """
    monitored_set = set(monitored)
    watched = {name: sub for name, sub in module.named_modules()
               if name and (name in monitored_set or not any(True for _ in sub.children()))}
    order: list[str] = []
    shapes: dict[str, list[int]] = {}
    producers: dict[Any, str] = {}
    consumers: dict[str, list[Any]] = {}

    def hook(name: str):
        def record(_module, inputs, output):
            if name in shapes or not isinstance(output, torch.Tensor):
                return
            order.append(name)
            shapes[name] = list(output.shape[1:])
            tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
            consumers[name] = [INPUT if t is source else t.grad_fn for t in tensors if t is source or t.grad_fn]
            passes_through = any(output is t for t in tensors)  # nn.Identity & co. produce nothing new
            if output.grad_fn is not None and output.grad_fn not in producers and not passes_through:
                producers[output.grad_fn] = name
        return record

    source = images[:1].detach().clone().requires_grad_(True)
    # prepended: each layer's own output, before the layers insert_layer put after it (steering/insertion.py)
    handles = [sub.register_forward_hook(hook(name), prepend=True) for name, sub in watched.items()]
    try:
        with eval_mode(module), torch.enable_grad():
            module(source)
    finally:
        for handle in handles:
            handle.remove()
    def sources(name: str, stop: dict[Any, str]) -> set[str]:
        found: set[str] = set()
        queue, seen = deque(consumers.get(name, [])), set()
        while queue and len(seen) < _MAX_GRAPH_NODES:
            node = queue.popleft()
            if node is None or node in seen:
                continue
            if node is INPUT:
                found.add("input")
                continue
            seen.add(node)
            owner = stop.get(node)
            if owner is not None and owner != name:
                found.add(owner)
                continue
            variable = getattr(node, "variable", None)
            if variable is not None and variable is source:
                found.add("input")
                continue
            queue.extend(next_node for next_node, _ in node.next_functions)
        return found

    leaf_order = [name for name in order if not any(True for _ in watched[name].children())]
    leaf_producers = {node: name for node, name in producers.items() if name in leaf_order}
    layer_producers = {node: name for node, name in producers.items() if name in monitored_set}
    edges = sorted({(src, dst) for dst in leaf_order for src in sources(dst, leaf_producers)},
                   key=lambda edge: (leaf_order.index(edge[1]), edge[0]))
    layer_order = [name for name in order if name in monitored_set]
    layer_edges = sorted({(src, dst) for dst in layer_order for src in sources(dst, layer_producers)},
                         key=lambda edge: (layer_order.index(edge[1]), edge[0]))
    modules = [{"name": name, "type": type(watched[name]).__name__, "output_shape": shapes[name],
                "params": sum(p.numel() for p in watched[name].parameters(recurse=False))} for name in leaf_order]
    return {"order": layer_order, "output_shapes": shapes, "modules": modules,
            "edges": [list(edge) for edge in edges], "layer_edges": [list(edge) for edge in layer_edges]}
