"""The per-step scalars the dashboard charts: their columns (``SCALAR_KEYS``, ``HISTORY_KEYS``), the fixed-capacity
ring that holds them (``Ring``), and which logged metric is a stage's loss or accuracy (``metric_name``)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

SCALAR_KEYS = ("step", "loss", "train_acc", "lr", "momentum", "weight_decay", "batch_size", "samples_per_s",
               "branch")
#: What the ring holds per step: the charted scalars and 1.0 where the loss was NaN or ±inf (so the divergence banner
#: can be recomputed when older steps are merged in front, ``RunState.merge_history``).
HISTORY_KEYS = (*SCALAR_KEYS, "loss_not_finite")
STAGE_WORDS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test",)}
KIND_WORDS = {"loss": ("loss",), "acc": ("acc", "accuracy")}


def metric_name(names, kind: str, stage: str) -> str | None:
    """Which logged metric is the ``stage``'s ("train" or "val") ``kind`` ("loss" or "acc"): a name with the kind as
    a word (``train_acc``, ``val/accuracy``, ``acc_step``, ``g_loss``) and no other stage's word, those naming the
    stage first, then the shortest. None if there is none."""
    others = {word for name, words in STAGE_WORDS.items() if name != stage for word in words}
    best = None
    for name in names:
        words = set(re.split(r"[/_.\-\s]+", name.lower()))
        if words & set(KIND_WORDS[kind]) and not words & others:
            rank = (not words & set(STAGE_WORDS[stage]), "epoch" in words, len(name), name)
            best = min(best, rank) if best else rank
    return best[-1] if best else None


class Ring:
    """Fixed-capacity columns of floats; ``total`` counts every row ever appended (a cursor for clients)."""

    def __init__(self, keys: tuple[str, ...], capacity: int) -> None:
        self.keys = keys
        self.capacity = capacity
        self.data = np.full((capacity, len(keys)), np.nan)
        self.total = 0

    def append(self, row: dict[str, Any]) -> None:
        values = [row.get(k) for k in self.keys]
        self.data[self.total % self.capacity] = [np.nan if v is None else float(v) for v in values]
        self.total += 1

    def since(self, cursor: int) -> tuple[dict[str, np.ndarray], int]:
        """Rows appended after ``cursor`` (or all kept rows when the cursor fell out of the ring)."""
        start = max(cursor, self.total - self.capacity, 0)
        idx = np.arange(start, self.total) % self.capacity
        block = self.data[idx]
        return {k: block[:, i] for i, k in enumerate(self.keys)}, start

    def __len__(self) -> int:
        return min(self.total, self.capacity)
