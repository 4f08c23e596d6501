"""Train the ReVACNN demo model (16-20-20 convs, 5×5) on sklearn's digits with ReVACNNCallback attached.

    python -m revacnn.demo.train_digits --epochs 20        (or: python examples/train_digits.py)
    revacnn-dash --connect lightning_logs/version_0/revacnn/connection.json     # in another terminal

Options choose the widths, the optimizer and the telemetry schedule; --help lists them.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="epochs to train (default 20)")
    parser.add_argument("--widths", type=int, nargs=3, default=(16, 20, 20), metavar=("C1", "C2", "C3"),
                        help="filters of the three conv layers (default 16 20 20, the paper's)")
    parser.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--filters-every", type=int, default=10, help="per-filter telemetry every N steps")
    parser.add_argument("--snapshot-every", type=int, default=50, help="full snapshots every N steps")
    parser.add_argument("--slow", type=float, default=0.0,
                        help="seconds to sleep per batch, so a short demo lasts long enough to watch and steer")
    parser.add_argument("--root", default=".", help="Lightning's default_root_dir (logs go to ROOT/lightning_logs)")
    parser.add_argument("--control-port", type=int, default=0, help="steering port (default: any free port)")
    parser.add_argument("--telemetry-port", type=int, default=0, help="telemetry port (default: any free port)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None,
                        help="the run's name in the dashboard, e.g. 'baseline lr 0.1' (at most 100 characters)")
    return parser.parse_args(argv)


class SlowDown(pl.Callback):
    """Sleeps after every batch: a demo on this small dataset would otherwise end before you open the page."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        import time

        time.sleep(self.seconds)


def main(argv=None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = ClassifierModule(ReVACNNNet(args.widths), lr=args.lr, optimizer=args.optimizer)
    data = DigitsDataModule(batch_size=args.batch_size)
    callbacks = [ReVACNNCallback(name=args.name, filters_every=args.filters_every, snapshot_every=args.snapshot_every,
                                 control_port=args.control_port, telemetry_port=args.telemetry_port)]
    if args.slow > 0:
        callbacks.append(SlowDown(args.slow))
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=callbacks, default_root_dir=args.root,
                         log_every_n_steps=10, enable_model_summary=False)
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
