"""The callback's extra memory: the training process's peak RSS with ReVACNNCallback minus without it, each fit in a
fresh process (so neither inherits the other's allocations), same model, data and steps.

    python benchmarks/memory.py                          # ResNet-50 (transformers ResNetConfig()), 60 steps, batch 8
    python benchmarks/memory.py --model revacnn --steps 300
    python benchmarks/memory.py --callback filters_every=1,snapshot_every=20   # another configuration

The callback runs at its defaults (the overhead budget): its first step measures per-filter data and takes a
snapshot, so the peak includes a snapshot in flight (packed, sent and recorded) and the copies it keeps between
measurements (the previous weights, for update ratios and per-filter change). Reported: peak RSS (``ru_maxrss``)
and the RSS at the fit's end, in MB, and their differences.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def child(args) -> None:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, os.path.dirname(__file__))
    from overhead import resnet50

    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, ReVACNNNet

    torch.manual_seed(0)
    net = resnet50() if args.model == "resnet50" else ReVACNNNet()
    data = TensorDataset(torch.randn(args.batch_size * 64, 3, 32, 32), torch.randint(0, 10, (args.batch_size * 64,)))
    callbacks = []
    if args.child == "callback":
        kwargs = dict(item.split("=") for item in args.callback.split(",")) if args.callback else {}
        callbacks.append(ReVACNNCallback(run_dir=tempfile.mkdtemp(), **{k: int(v) for k, v in kwargs.items()}))
    trainer = pl.Trainer(max_steps=args.steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(ClassifierModule(net), DataLoader(data, batch_size=args.batch_size))
    with open("/proc/self/statm") as handle:
        resident = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "end_mb": resident / 2**20}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=("resnet50", "revacnn"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--callback", default="", help="ReVACNNCallback arguments, KEY=VALUE,… (integers)")
    parser.add_argument("--child", choices=("bare", "callback"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    results = {}
    for kind in ("bare", "callback"):
        command = [sys.executable, __file__, "--child", kind, "--model", args.model, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--callback", args.callback]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[kind] = json.loads(output.strip().splitlines()[-1])
    bare, callback = results["bare"], results["callback"]
    print(f"{args.model}, {args.steps} steps, batch {args.batch_size}, callback {args.callback or 'defaults'}")
    print("| | peak RSS, MB | RSS at the end, MB |\n| --- | --- | --- |")
    print(f"| bare | {bare['peak_mb']:.0f} | {bare['end_mb']:.0f} |")
    print(f"| with ReVACNNCallback | {callback['peak_mb']:.0f} | {callback['end_mb']:.0f} |")
    print(f"| **extra** | **{callback['peak_mb'] - bare['peak_mb']:.0f}** | "
          f"**{callback['end_mb'] - bare['end_mb']:.0f}** |")


if __name__ == "__main__":
    main()
