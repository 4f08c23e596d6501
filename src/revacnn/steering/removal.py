"""``remove_layer``'s module surgery: a layer replaced by its identity, or an insertion taken out.

- a conv (in == out channels, odd kernel) becomes a ``CentreTap``: no parameters, the conv's geometry attributes
  kept (the model's code may read ``stride`` or ``kernel_size``, as HF MobileNetV2's ``tf_padding`` does), and its
  output is what the conv would give with a kernel that is 1 at the centre tap of each channel's own input and 0
  elsewhere: the identity on the feature map when the conv keeps its size (padding k//2, or the model's own
  "same" padding before it), a crop or subsampling otherwise — never a shape the model's next layer does not take;
- a Linear (in == out features) or a BatchNorm becomes ``nn.Identity()``;
- the conv or Linear of an insertion (``<anchor>.inserted.conv``) takes the whole insertion out (its activation copy,
  layer and BatchNorm), as if never inserted.

Layers inserted after a removed layer stay, after its replacement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .insertion import attach_insertion, detach_insertion, insertion_of, inserted_layer_owner, parent_of

GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


class CentreTap(nn.Module):
    """What a removed conv leaves: its centre tap, as a parameter-free module with the conv's attributes.

    ``forward`` pads as the conv would (its ``padding`` and ``padding_mode``), then takes along each spatial dim
    every ``stride``-th value starting at ``dilation · (k // 2)``, as many as the conv outputs. Preserves: the conv's
    output shape and every attribute in ``GEOMETRY``; the input exactly when the conv kept the size.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        for attr in GEOMETRY:
            setattr(self, attr, getattr(conv, attr))
        self.spatial = len(conv.kernel_size)

    def _pads(self) -> list[tuple[int, int]]:
        if self.padding == "valid":
            return [(0, 0)] * self.spatial
        if self.padding == "same":  # torch's split: the odd extra on the right
            return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(self.kernel_size, self.dilation)]
        return [(p, p) for p in self.padding]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self._pads()
        flat = [side for pair in reversed(pads) for side in pair]  # F.pad lists the last dim first
        if any(flat):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, flat, mode=mode)
        index = [slice(None)] * (x.dim() - self.spatial)
        for size, k, s, d in zip(x.shape[-self.spatial:], self.kernel_size, self.stride, self.dilation):
            out = (size - d * (k - 1) - 1) // s + 1
            start = d * (k // 2)
            index.append(slice(start, start + s * (out - 1) + 1, s))
        return x[tuple(index)]

    def extra_repr(self) -> str:
        return f"{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def replacement_for(mod: nn.Module) -> nn.Module:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CentreTap(mod)
    return nn.Identity()


def remove(root: nn.Module, name: str) -> tuple[nn.Module, list[nn.Module]]:
    """Remove the layer ``name`` (see the module docstring); returns ``(what replaced it or None, the modules taken
    out)``. Preserves every other module, parameter and name; layers inserted after ``name`` stay after its
    replacement."""
    owner = inserted_layer_owner(root, name)
    if owner is not None:
        anchor = root.get_submodule(owner) if owner else root
        container = detach_insertion(anchor)
        return None, list(container.modules())
    parent, child = parent_of(root, name)
    old = getattr(parent, child)
    new = replacement_for(old)
    if insertion_of(old) is not None:
        attach_insertion(new, detach_insertion(old))
    setattr(parent, child, new)
    return new, list(old.modules())  # (an insertion after ``old`` was moved off it first)
