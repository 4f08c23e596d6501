"""A 2-process CPU DDP run (gloo) with ReVACNNCallback, started as a subprocess by tests/test_ddp.py.

Each rank saves its final parameters (and optimizer state) to RUN_DIR/rank<R>.pt so the test can compare ranks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.steering.restore_store import RestorePolicy
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet


class SaveEachRank(pl.Callback):
    def __init__(self, run_dir: Path, slow: float) -> None:
        self.run_dir = run_dir
        self.slow = slow

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.slow)

    def on_train_end(self, trainer, pl_module) -> None:
        revacnn = next(c for c in trainer.callbacks if isinstance(c, ReVACNNCallback))
        state = {"model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                 "optimizer": trainer.optimizers[0].state_dict(), "step": trainer.global_step,
                 "branches": revacnn.rewinds.branches if revacnn.rewinds is not None else []}
        torch.save(state, self.run_dir / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--restore-every", type=int, default=500, help="RestorePolicy.every_steps")
    parser.add_argument("--model", choices=["revacnn", "mobilenet_v2_small"], default="revacnn",
                        help="the net: the demo's, or HF MobileNetV2 from tests/zoo.py")
    parser.add_argument("--default-run-dir", action="store_true",
                        help="leave the callback's run_dir unset: it records under the trainer's log directory")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    callback = ReVACNNCallback(run_dir=None if args.default_run_dir else args.run_dir, filters_every=2,
                               snapshot_every=10, record=True,
                               restore_points=RestorePolicy(every_steps=args.restore_every))
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=args.epochs,
                         limit_train_batches=args.batches, limit_val_batches=2, logger=False,
                         accumulate_grad_batches=args.accumulate,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, SaveEachRank(args.run_dir, args.slow)], default_root_dir=args.run_dir)
    trainer.fit(ClassifierModule(build_net(args.model), lr=0.05), DigitsDataModule(batch_size=16))


def build_net(name: str) -> torch.nn.Module:
    if name == "revacnn":
        return ReVACNNNet()
    import zoo  # tests/ is this script's directory, so on its path
    return zoo.calibrate(zoo.mobilenet_v2_small())


if __name__ == "__main__":
    main()
