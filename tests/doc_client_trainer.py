"""The trainer tests/test_doc_client.py talks to through tests/doc_client.py (not a test module).

    python tests/doc_client_trainer.py --run-dir DIR [--sign]

A tiny demo CNN (8×8 grey digits, 4-4-4 filters) with short epochs and small cadences, so every telemetry type
appears within a few seconds; it trains until a `stop` command (or --max-steps) and writes DIR/connection.json.
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet


class Pace(pl.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *unused) -> None:
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--sign", action="store_true")
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--slow", type=float, default=0.02, help="seconds of sleep after each batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = ClassifierModule(ReVACNNNet((4, 4, 4), in_channels=1, image_size=8), lr=0.02)
    data = DigitsDataModule(batch_size=8, image_size=8, channels=1)
    callback = ReVACNNCallback(filters_every=5, snapshot_every=25, probe_images=2, val_subset=50,
                               run_dir=args.run_dir, sign=args.sign, record=False)
    trainer = pl.Trainer(max_steps=args.max_steps, max_epochs=-1, callbacks=[callback, Pace(args.slow)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_train_batches=args.batches, limit_val_batches=1,
                         num_sanity_val_steps=0, default_root_dir=args.run_dir, accelerator="cpu")
    trainer.fit(model, data)
    print(f"DONE {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
