"""revacnn: watch and steer the training of convolutional networks while it runs.

The torch-free parts (``revacnn.wire.protocol``, ``revacnn.wire.client``, ``revacnn.recording.reader``) import without torch, so a
laptop with ``revacnn[dash]`` can use them. The training side (``ReVACNNCallback``, ``revacnn.steering``) is loaded
on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ReVACNNCallback": ("revacnn.callback", "ReVACNNCallback"),
    "RunClient": ("revacnn.wire.client", "RunClient"),
    "load_steered": ("revacnn.steering.changelog", "load_steered"),
    "RestorePolicy": ("revacnn.steering.restore_store", "RestorePolicy"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'revacnn' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
