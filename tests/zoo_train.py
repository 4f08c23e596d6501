"""A real training run of a zoo model with ReVACNNCallback on fixed ports, for the browser test of issue 27
(tests/test_zoo_browser.py starts and kills it). Not a test module.

    python tests/zoo_train.py --model mobilenet_v2_small --root DIR --control-port P --telemetry-port Q
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
import zoo

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule


class SlowDown(pl.Callback):
    """Sleep after every batch, so the run lasts while the browser steers it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilenet_v2_small")
    parser.add_argument("--root", required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--telemetry-port", type=int, required=True)
    parser.add_argument("--slow", type=float, default=0.05)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = zoo.calibrate(zoo.mobilenet_v2_small()) if args.model == "mobilenet_v2_small" else zoo.build(args.model)
    callback = ReVACNNCallback(filters_every=5, snapshot_every=0, control_port=args.control_port,
                               telemetry_port=args.telemetry_port)
    trainer = pl.Trainer(max_epochs=500, callbacks=[callback, SlowDown(args.slow)], default_root_dir=args.root,
                         limit_train_batches=20, limit_val_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(ClassifierModule(net, lr=0.01), DigitsDataModule(batch_size=16))


if __name__ == "__main__":
    main()
