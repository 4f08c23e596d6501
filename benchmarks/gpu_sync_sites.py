"""Every place where training with ReVACNNCallback makes the host wait for the GPU, found in one short run.

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronizing CUDA operation (``.item()``, ``.tolist()``, a
blocking copy either way, ``nonzero``, a stream or device synchronize…) warn. This runs short fits of the demo CNN and
of the ResNet on the GPU with the callback at its busiest — per-filter data every step, snapshots with probe maps
every few steps, a validation every 20 steps, the recorder on, one layer frozen in the ResNet run — records each of
those warnings with the Python stack that raised it, and prints every site once: how often it fired, in which phase
of the fit, and whose code it is (the innermost revacnn frame, else the innermost frame outside torch).

Phases: ``fit start`` (set-up, until the first training batch), ``training loop`` (training batches and whatever
runs between them, epoch boundaries included), ``validation``, ``fit end``. The exit status is 1 when revacnn's code
synced in the training loop — the promise of docs/design.md is that it never does — and 0 otherwise. Syncs of
Lightning's own or in the other phases are listed for information: ``benchmarks/overhead.py --sync-debug`` turns
the same mode to ``"error"`` around the training steps, which only works where Lightning's loop does not sync
either.

    python benchmarks/gpu_sync_sites.py                 # needs a CUDA device
    python benchmarks/gpu_sync_sites.py --steps 200     # longer fits
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import traceback
import warnings

import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet, SmallResNet

REVACNN_DIR = os.path.dirname(os.path.abspath(sys.modules["revacnn"].__file__))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class Phase:
    """Which phase of the fit is running, kept by two callbacks: ``PhaseFirst`` goes first in the callback list and
    ``PhaseLast`` last, so that every other callback's hooks at a boundary run inside the phase they belong to."""

    def __init__(self) -> None:
        self.name = "fit start"


class PhaseFirst(pl.Callback):
    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def on_train_batch_start(self, *args):
        self.phase.name = "training loop"

    def on_validation_start(self, *args):
        self.phase.name = "validation"

    def on_train_end(self, *args):
        self.phase.name = "fit end"


class PhaseLast(pl.Callback):
    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def on_validation_end(self, *args):
        self.phase.name = "training loop"


class SyncSites:
    """Collects the sync-debug warnings with their stacks, keyed by (phase, owner, site)."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.count: collections.Counter = collections.Counter()
        self.stacks: dict[tuple, str] = {}

    def showwarning(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            print(f"{category.__name__}: {message} ({filename}:{lineno})", file=sys.stderr)
            return
        frames = traceback.extract_stack()[:-1]
        ours = [frame for frame in frames if os.path.abspath(frame.filename).startswith(REVACNN_DIR)]
        outside = [frame for frame in frames if not os.path.abspath(frame.filename).startswith(TORCH_DIR)
                   and "warnings" not in frame.filename and frame.filename != __file__]
        owner, frame = ("revacnn", ours[-1]) if ours else ("other", outside[-1] if outside else frames[-1])
        where = (f"{os.path.relpath(frame.filename, os.path.dirname(REVACNN_DIR))}:{frame.lineno} in {frame.name}"
                 if owner == "revacnn" else f"{frame.filename}:{frame.lineno} in {frame.name}")
        key = (self.phase.name, owner, where, threading.current_thread().name)
        self.count[key] += 1
        self.stacks.setdefault(key, "".join(traceback.format_list(frames[-12:])))


def fit(model_name: str, steps: int, root: str, sites: SyncSites, accelerator: str = "cuda") -> None:
    torch.manual_seed(0)
    net = SmallResNet((32, 64, 128)) if model_name == "resnet" else ReVACNNNet()
    if model_name == "resnet":  # a frozen layer: the per-filter reduction masks its gradient fields
        net.conv1.weight.requires_grad_(False)
    model = ClassifierModule(net, lr=0.02)
    data = DigitsDataModule(batch_size=64)
    callback = ReVACNNCallback(filters_every=1, snapshot_every=7, run_dir=os.path.join(root, model_name))
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, val_check_interval=20, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[PhaseFirst(sites.phase), callback, PhaseLast(sites.phase)])
    sites.phase.name = "fit start"
    trainer.fit(model, data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="training steps of each fit (default 80)")
    parser.add_argument("--model", action="append", choices=("revacnn", "resnet"),
                        help="which model to fit (repeatable; default both)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (torch.cuda.is_available() is False)")
    phase = Phase()
    sites = SyncSites(phase)
    warnings.showwarning = sites.showwarning
    warnings.simplefilter("always")
    # A sync that must be seen: without it a run that captures nothing would pass as one that found nothing.
    torch.cuda.set_sync_debug_mode("warn")
    torch.ones(1, device="cuda").item()
    torch.cuda.set_sync_debug_mode(0)
    if not sites.count:
        print("FAIL: a planted .item() raised no sync-debug warning that this script saw; it cannot find syncs here "
              f"(warnings.showwarning is {warnings.showwarning!r}, filters {warnings.filters[:3]})")
        return 2
    sites.count.clear()
    sites.stacks.clear()
    with tempfile.TemporaryDirectory() as root:
        for model_name in args.model or ["revacnn", "resnet"]:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fit(model_name, args.steps, root, sites)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            print(f"{model_name}: {args.steps} steps fitted", file=sys.stderr, flush=True)
    print(f"\nSynchronizing CUDA operations, torch {torch.__version__}, {torch.cuda.get_device_name()}\n")
    print("| phase | whose | site | thread | times |\n| --- | --- | --- | --- | --- |")
    for key, times in sorted(sites.count.items()):
        print(f"| {' | '.join(key)} | {times} |")
    failing = [key for key in sites.count if key[0] == "training loop" and key[1] == "revacnn"]
    for key in failing:
        print(f"\nrevacnn synced in the training loop at {key[2]}:\n{sites.stacks[key]}")
    print(f"\n{'FAIL' if failing else 'OK'}: {len(failing)} revacnn site(s) synced in the training loop")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
