"""A small real Lightning run with ReVACNNCallback, driven by the security and fault tests (not a test module).

    python tests/remote_trainer.py --root DIR [--host 10.77.0.1 --keys-dir KEYS] [--max-steps N] [--slow S] ...

Prints ``CONNECTION <path>`` once the sockets are bound and, at the end, ``DONE <json>`` with the global step, the
final learning rate and a SHA-256 of the model's and optimizer's state (training is deterministic for a given seed,
so two runs that were not steered end with the same digest whatever happened to their clients).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet


def state_digest(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for index, state in sorted(optimizer.state_dict()["state"].items()):
        for key, value in sorted(state.items()):
            digest.update(f"{index}.{key}".encode())
            digest.update(value.cpu().contiguous().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode())
    return digest.hexdigest()


class Pace(pl.Callback):
    """Sleeps per batch / per validation batch / per checkpoint save, so a test can act while each happens."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def on_train_batch_end(self, *unused) -> None:
        if self.args.slow:
            time.sleep(self.args.slow)

    def on_validation_batch_end(self, *unused) -> None:
        if self.args.slow_val:
            time.sleep(self.args.slow_val)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.args.slow_checkpoint:
            marker = os.path.join(self.args.root, "saving")
            open(marker, "w").close()
            print(f"SAVING {trainer.global_step}", flush=True)
            time.sleep(self.args.slow_checkpoint)
            os.unlink(marker)


class Announce(pl.Callback):
    def __init__(self, callback: ReVACNNCallback) -> None:
        self.callback = callback

    def on_train_start(self, trainer, pl_module) -> None:
        print(f"CONNECTION {self.callback.connection_file}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--keys-dir")
    parser.add_argument("--insecure-bind", action="store_true")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--slow-val", type=float, default=0.0)
    parser.add_argument("--slow-checkpoint", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=0, help="validate every N training batches (0: per epoch)")
    parser.add_argument("--filters-every", type=int, default=10)
    parser.add_argument("--snapshot-every", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="8×8 grey digits, 4-4-4 filters, batch 8: fast steps")
    parser.add_argument("--run-dir")
    parser.add_argument("--no-disk-budget", action="store_true",
                        help="record without a disk budget or free-space margin (to reach a full disk's error)")
    parser.add_argument("--queue-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    if args.tiny:
        model = ClassifierModule(ReVACNNNet((4, 4, 4), in_channels=1, image_size=8), lr=0.02)
        data = DigitsDataModule(batch_size=8, image_size=8, channels=1)
    else:
        model = ClassifierModule(ReVACNNNet((8, 8, 8)), lr=0.02)
        data = DigitsDataModule(batch_size=32)
    revacnn = ReVACNNCallback(host=args.host, keys_dir=args.keys_dir, insecure_bind=args.insecure_bind,
                              filters_every=args.filters_every, snapshot_every=args.snapshot_every,
                              run_dir=args.run_dir, queue_size=args.queue_size, val_subset=100,
                              **({"disk_budget": None, "disk_min_free": None} if args.no_disk_budget else {}))
    callbacks = [revacnn, Announce(revacnn), Pace(args)]
    if args.checkpoint_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(args.root, "ckpt"), save_top_k=-1,
                                                      every_n_train_steps=args.checkpoint_every))
    trainer = pl.Trainer(max_steps=args.max_steps, max_epochs=-1, callbacks=callbacks, default_root_dir=args.root,
                         logger=False, enable_checkpointing=bool(args.checkpoint_every), enable_progress_bar=False,
                         enable_model_summary=False, val_check_interval=args.val_every or 1.0,
                         limit_val_batches=2 if args.tiny else 3, num_sanity_val_steps=0)
    trainer.fit(model, data)
    optimizer = trainer.optimizers[0]
    print("DONE " + json.dumps({"step": trainer.global_step, "lr": optimizer.param_groups[0]["lr"],
                                "digest": state_digest(model, optimizer),
                                "recording_error": getattr(revacnn.recorder, "error", None)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
