"""ReVACNN §4.2, reproduced live: add a filter to a trained 20-20-20 model at a loss plateau.

Three runs on the same data order (same seed), each a real Lightning Trainer with ReVACNNCallback:

* **steered** — 20-20-20 trained to a plateau, then, *while it trains*, a ``widen`` command (conv3 +1 filter,
  Net2Net by default) sent over the run's control socket, exactly as the dashboard sends it; training goes on;
* **left alone** — the same 20-20-20 run without the command;
* **from scratch** — a 20-20-21 model trained for the whole length.

The plateau is detected online: the command goes out once the mean training loss over the last ``--window`` steps
improved by less than ``--plateau`` (relative) on the window before it. Curves go to a PNG, numbers to stdout and a
JSON file.

    python examples/steering_experiment.py --epochs 12 --out docs/img
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.client import RunClient
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet


class History(pl.Callback):
    """Training loss per step and validation loss/accuracy per epoch."""

    def __init__(self) -> None:
        self.train_loss: list[float] = []
        self.val: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_loss.append(float(outputs["loss"]))  # examples may sync; the callback itself never does

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.val.append((trainer.global_step, float(metrics["val_loss"]), float(metrics["val_acc"])))


class WidenAtPlateau(pl.Callback):
    """Watches the training loss and, at the first plateau after ``min_step``, sends one widen command."""

    def __init__(self, revacnn: ReVACNNCallback, history: History, layer: str, window: int, plateau: float,
                 min_step: int, init: str) -> None:
        self.revacnn, self.history = revacnn, history
        self.layer, self.window, self.plateau, self.min_step, self.init = layer, window, plateau, min_step, init
        self.client: RunClient | None = None
        self.sent_at: int | None = None
        self.ack: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sent_at is None and trainer.global_step >= self.min_step:
            losses = self.history.train_loss
            recent = np.mean(losses[-self.window:])
            before = np.mean(losses[-2 * self.window:-self.window])
            if (before - recent) / before < self.plateau:
                self.client = RunClient(self.revacnn.connection_file)
                self.client.connect()
                self.client.send_command("widen", {"layer": self.layer, "count": 1, "init": self.init})
                self.sent_at = trainer.global_step
        if self.client is not None and self.ack is None:
            message = self.client.recv(0.0)
            if message is not None and message.type == "ack" and message.body["status"] != "queued":
                self.ack = message.body

    def on_train_end(self, trainer, pl_module):
        if self.client is not None:
            self.client.close()


def train(widths, args, steer: bool = False):
    pl.seed_everything(args.seed, verbose=False)
    model = ClassifierModule(ReVACNNNet(widths), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    history = History()
    revacnn = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    callbacks = [revacnn, history]
    steerer = None
    if steer:
        steerer = WidenAtPlateau(revacnn, history, "net.conv3", args.window, args.plateau, args.min_step, args.init)
        callbacks.append(steerer)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=args.root)
    trainer.fit(model, DigitsDataModule(batch_size=args.batch_size, seed=args.seed))
    return history, steerer, model


def smooth(values: list[float], width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.convolve(np.asarray(values), kernel, mode="valid")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.003, help="small on purpose, so a plateau shows (default 0.003)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--window", type=int, default=100, help="steps per window of the plateau test")
    parser.add_argument("--plateau", type=float, default=0.05, help="relative improvement below which it is one")
    parser.add_argument("--min-step", type=int, default=300, help="earliest step for the widen command")
    parser.add_argument("--init", choices=("net2net", "random"), default="net2net",
                        help="net2net keeps the function; random is the paper's U(-0.2, 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG and the JSON")
    parser.add_argument("--root", default="/tmp/revacnn-steering-experiment")
    args = parser.parse_args(argv)

    steered, steerer, steered_model = train((20, 20, 20), args, steer=True)
    alone, _, _ = train((20, 20, 20), args)
    scratch, _, _ = train((20, 20, 21), args)
    if steerer.sent_at is None or steerer.ack is None or steerer.ack["status"] != "done":
        raise SystemExit(f"the widen command did not take effect: sent at {steerer.sent_at}, ack {steerer.ack}")
    assert steered_model.net.conv3.weight.shape[0] == 21

    step = steerer.ack["step"]
    width = 50
    results = {"widen_sent_at_step": steerer.sent_at, "widen_applied_at_step": step,
               "output_change_at_widen": steerer.ack["result"]["changes"].get("output_max_abs_change"),
               "init": args.init, "epochs": args.epochs, "lr": args.lr}
    for name, history in (("steered 20-20-20→21", steered), ("20-20-20 left alone", alone),
                          ("20-20-21 from scratch", scratch)):
        final = history.val[-1]
        results[name] = {"final_train_loss_mean_last_100": float(np.mean(history.train_loss[-100:])),
                         "final_val_loss": final[1], "final_val_acc": final[2],
                         "train_loss_mean_after_widen": float(np.mean(history.train_loss[step:]))}
    print(json.dumps(results, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "steering_experiment.json").write_text(json.dumps(results, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, history, colour in (("steered: 20-20-20, conv3 +1 at the plateau", steered, "#d62728"),
                                   ("20-20-20 left alone", alone, "#1f77b4"),
                                   ("20-20-21 from scratch", scratch, "#2ca02c")):
        curve = smooth(history.train_loss, width)
        left.plot(np.arange(len(curve)) + width, curve, label=label, color=colour, lw=1.4)
        steps, losses, _ = zip(*history.val)
        right.plot(steps, losses, marker="o", ms=3, label=label, color=colour)
    for axis in (left, right):
        axis.axvline(step, color="#d62728", ls="--", lw=1)
        axis.set_xlabel("optimizer step")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    left.set_ylabel(f"training loss (moving mean of {width})")
    right.set_ylabel("validation loss")
    left.set_title("Training loss — dashed: widen applied live")
    right.set_title("Validation loss per epoch")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out / "steering_experiment.png", dpi=110)
    print(f"wrote {args.out / 'steering_experiment.png'}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
