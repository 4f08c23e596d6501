"""Layers inserted after a layer (``insert_layer``) without moving it, and taken out again.

The new layers form a ``Sequential`` registered on the anchor as its child ``inserted`` and run by a forward hook
of the anchor (``run_inserted``) on the anchor's output. So the anchor keeps its name, its type and every attribute
the model's own code may read (HF MobileNetV2's forward reads ``convolution.stride``); the new layers' parameters are
registered modules (``<anchor>.inserted.conv.weight``: in the state_dict, seen by DDP when it wraps the model, by
optimizer surgery and by ``named_modules``); the hook is a module-level function that finds the container on the
module it is called with, so ``copy.deepcopy`` and pickling keep it working. Hooks that must see the anchor's own
output (telemetry, coupling analysis) register with ``prepend=True``, which runs them before ``run_inserted``.

A container is ``Sequential(act?, conv | linear, bn?)``:

- ``act``: a copy of the idempotent activation (ReLU, or a clamp such as ReLU6) the model applies to the anchor's
  output, present when that activation follows; the model applies its own after the new layers, and
  act(identity(act(y))) = act(y) because the new layer is the identity on act(y);
- ``conv``: a conv of the anchor's class and groups with an odd kernel (the anchor's, or one less when it is even:
  a patchify 4×4 or 2×2 conv gets a 3×3 or 1×1 identity), 1 at the kernel centre, stride 1, padding k//2;
  ``linear``: an identity Linear of the anchor's width;
- ``bn``: a BatchNorm that is the identity in eval mode (running mean 0, var 1, gamma √(1+eps), beta 0).

Inserting after a layer that already has an insertion goes after the end of that chain. ``legacy_sequential``
replays the change-log entries of earlier versions, which moved the anchor into a ``Sequential``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

INSERTED = "inserted"  # the child of an anchor that holds the layers inserted after it
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # not the transposed ones (as steering/graph.py's CONVS)


def run_inserted(module: nn.Module, inputs, output):
    """The forward hook of an anchor: its output through the layers inserted after it."""
    return module._modules[INSERTED](output)


def parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def insertion_of(mod: nn.Module) -> nn.Sequential | None:
    """The container of the layers inserted after ``mod``, or None."""
    found = mod._modules.get(INSERTED)
    return found if any(hook is run_inserted for hook in mod._forward_hooks.values()) else None


def own_named_parameters(mod: nn.Module):
    """``mod.named_parameters()`` without the parameters of the layers inserted after ``mod`` (a layer's freeze,
    its trainability)."""
    skip = INSERTED + "." if insertion_of(mod) is not None else None
    return [(n, p) for n, p in mod.named_parameters() if skip is None or not n.startswith(skip)]


def chain_end(root: nn.Module, anchor: str, like: str) -> tuple[str, str]:
    """``(anchor, like)`` for the next insertion after ``anchor``, whose channels the layer ``like`` produces: the
    last module of its insertion chain, and the conv or Linear inserted last (it may have fewer channels than
    ``like`` once ``like`` was widened)."""
    while (container := insertion_of(root.get_submodule(anchor))) is not None:
        layer = "conv" if "conv" in container._modules else "linear"
        like = f"{anchor}.{INSERTED}.{layer}"
        anchor = f"{anchor}.{INSERTED}.{next(reversed(container._modules))}"
    return anchor, like


def odd_kernel(kernel: tuple[int, ...]) -> tuple[int, ...]:
    """The anchor's kernel size, each even size made one smaller (an even kernel has no centre tap)."""
    return tuple(k if k % 2 else k - 1 for k in kernel)


def identity_conv(like: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> nn.Module:
    """A C→C conv of ``like``'s torch class (Conv1d/2d/3d: a subclass may take other arguments) and groups (C = its
    output channels), kernel ``odd_kernel(like)``: 1 at the
    kernel centre of each channel's own input, zero elsewhere, padding k//2, stride 1, zero bias when ``like`` has
    a bias.

    Preserves: its input exactly (it is the identity map) for any input, on ``like``'s device, dtype and weight
    memory format.
    """
    c, groups = like.out_channels, like.groups
    kernel = odd_kernel(tuple(like.kernel_size))
    kind = next(k for k in CONVS if isinstance(like, k))
    conv = kind(c, c, kernel, padding=tuple(k // 2 for k in kernel), groups=groups,
                      bias=like.bias is not None, device=like.weight.device, dtype=like.weight.dtype)
    conv.to(memory_format=_memory_format(like.weight))
    per_group = c // groups
    with torch.no_grad():
        conv.weight.zero_()
        centre = tuple(k // 2 for k in kernel)
        for i in range(c):
            conv.weight[(i, i % per_group, *centre)] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if last is not None and not t.is_contiguous() and t.is_contiguous(memory_format=last):
        return last
    return torch.contiguous_format


def identity_linear(like: nn.Linear) -> nn.Linear:
    """An F→F Linear (F = ``like``'s output features) with an identity weight and a zero bias when ``like`` has one.

    Preserves: its input exactly on any ``[..., F]`` input.
    """
    f = like.out_features
    linear = nn.Linear(f, f, bias=like.bias is not None, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(f, dtype=like.weight.dtype, device=like.weight.device))
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


def identity_bn(channels: int, dims: int, like: torch.Tensor) -> nn.Module:
    """BatchNorm1d/2d/3d over ``channels`` for an input of ``dims`` dimensions (2 or 3: 1d, 4: 2d, 5: 3d) that is
    the identity in eval mode: running mean 0, var 1, gamma √(1+eps), beta 0.

    Preserves: its input exactly in eval mode (up to one rounding of √(1+eps)); in train mode it normalises by batch
    statistics and is therefore not function-preserving.
    """
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dims]
    bn = kind(channels, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    return bn


def activation_module(spec) -> nn.Module:
    """The activation a change-log ``activation`` names: ``["relu"]`` or ``["hardtanh", min, max]``."""
    if spec[0] == "relu":
        return nn.ReLU()
    if spec[0] == "hardtanh":
        return nn.Hardtanh(float(spec[1]), float(spec[2]))
    raise ValueError(f"unknown activation {spec!r}")


def insert_after(root: nn.Module, entry: dict) -> nn.Sequential:
    """Insert the layers of a change-log ``entry`` (``anchor``, ``like``, ``activation``, ``batchnorm``,
    ``bn_dims``) after the module ``entry["anchor"]``; returns the container.

    Preserves: every existing module and parameter object, name and attribute; the function exactly (the new
    layers compute the identity on what reaches them; the BN in eval mode only).
    """
    anchor = root.get_submodule(entry["anchor"])
    like = root.get_submodule(entry["like"])
    layers: list[tuple[str, nn.Module]] = []
    if entry.get("activation"):
        layers.append(("act", activation_module(entry["activation"])))
    layers.append(("linear", identity_linear(like)) if isinstance(like, nn.Linear) else ("conv", identity_conv(like)))
    if entry.get("batchnorm"):
        channels = layers[-1][1].weight.shape[0]
        layers.append(("bn", identity_bn(channels, int(entry["bn_dims"]), like.weight)))
    container = nn.Sequential(OrderedDict(layers))
    anchor.add_module(INSERTED, container)
    anchor.register_forward_hook(run_inserted)
    return container


def detach_insertion(mod: nn.Module) -> nn.Sequential:
    """Take the layers inserted after ``mod`` off it (the container and its hook); returns the container."""
    for key in [k for k, hook in mod._forward_hooks.items() if hook is run_inserted]:
        del mod._forward_hooks[key]
    return mod._modules.pop(INSERTED)


def attach_insertion(mod: nn.Module, container: nn.Sequential) -> None:
    """Put a container taken off another module after ``mod``."""
    mod.add_module(INSERTED, container)
    mod.register_forward_hook(run_inserted)


def sync_insertion_hook(mod: nn.Module) -> None:
    """Make ``mod``'s forward hooks agree with its children: the hook that runs inserted layers exactly when it holds
    an ``inserted`` container. A restore point puts a module tree back whole, without hooks (others' hooks added
    since must stay); an insertion's hook follows its container by this rule."""
    hooked = [key for key, hook in mod._forward_hooks.items() if hook is run_inserted]
    if INSERTED in mod._modules and not hooked:
        mod.register_forward_hook(run_inserted)
    elif INSERTED not in mod._modules:
        for key in hooked:
            del mod._forward_hooks[key]


def inserted_layer_owner(root: nn.Module, name: str) -> str | None:
    """The anchor whose insertion ``name`` is the conv or Linear of (``a.inserted.conv`` → ``a``), else None."""
    head, _, last = name.rpartition(".")
    owner, _, child = head.rpartition(".")
    if child != INSERTED or last not in ("conv", "linear") or not head:
        return None
    mod = root.get_submodule(owner) if owner else root
    return owner if insertion_of(mod) is not None else None


def legacy_sequential(root: nn.Module, entry: dict) -> nn.Sequential:
    """Replay an ``insert_layer`` entry of earlier versions (no ``keeps_anchor``): the anchor moved into
    ``Sequential(anchor, [ReLU], identity conv, [identity BN])`` at its name (its parameters named ``<anchor>.0.*``)."""
    parent, child = parent_of(root, entry["anchor"])
    anchor = getattr(parent, child)
    like = root.get_submodule(entry["like"]) if entry["like"] != entry["anchor"] else anchor
    layers: list[nn.Module] = [anchor]
    if entry.get("relu"):
        layers.append(nn.ReLU())
    conv = identity_conv(like)
    layers.append(conv)
    if entry.get("batchnorm"):
        layers.append(identity_bn(conv.out_channels, conv.weight.dim(), conv.weight))
    seq = nn.Sequential(*layers)
    setattr(parent, child, seq)
    return seq
