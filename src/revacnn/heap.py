"""The process's heap: giving freed memory back to the operating system. No torch, no pyarrow: the training side's
telemetry and the torch-free recording both use it."""

from __future__ import annotations

import ctypes

_malloc_trim = None


def release_freed_memory() -> None:
    """Give freed heap memory back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    A snapshot of a large model is built from and written through many buffers of a few MB each; glibc keeps the
    freed ones in its heap, and a ResNet-50's snapshots left ~190 MB of RSS behind that nothing used."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
