"""ReVACNN §4.1's observations, measured on short CPU runs of the paper's demo CNN on a colour dataset we generate.

    python benchmarks/observations.py              # ~3 minutes on 2 cores; writes docs/img/analysis-observations*,
                                                   # docs/img/analysis-conv1-filters.png

Dataset ("colour digits"): sklearn's 8×8 digits upsampled to 16×16; every image gets a random foreground colour and
a random background colour (each RGB channel uniform in [0, 1], independent of the class), image =
ink·fg + (1 − ink)·bg. Colour carries no class information, so a network has to learn shape across colours.
Runs (ReVACNNNet 16-20-20, SGD momentum 0.9, batch 32): one per ``--lrs`` (default 0.05, 0.02, 0.002; same seed
and epochs), recorded with ReVACNNCallback(filters_every=10, snapshot_every=25). For every snapshot: Hopkins statistic
and mean nearest-neighbour cosine of each conv layer's filters, conv1 channel concentration, validation accuracy
(revacnn_dash.analysis.observations.track_observations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dashboard"))


def colour_digits(image_size: int = 16, seed: int = 0):
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    ink = F.interpolate(ink, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    fg = torch.rand(len(ink), 3, 1, 1, generator=g)
    bg = torch.rand(len(ink), 3, 1, 1, generator=g)
    images = (ink * fg + (1 - ink) * bg - 0.5) / 0.5
    return images.contiguous(), torch.from_numpy(digits.target.astype(np.int64))


def make_data(batch_size=32, image_size=16, seed=0):
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = colour_digits(image_size, seed)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:300], order[300:]

    class ColourDigits(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))

        def val_dataloader(self):
            return DataLoader(TensorDataset(images[val], labels[val]), batch_size=300)

    return ColourDigits()


def train(root: Path, lr: float, epochs: int, seed: int = 0) -> Path:
    import pytorch_lightning as pl
    import torch

    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, ReVACNNNet

    torch.manual_seed(seed)
    callback = ReVACNNCallback(filters_every=10, snapshot_every=25)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], default_root_dir=root, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         logger=pl.loggers.CSVLogger(root), val_check_interval=0.5)
    trainer.fit(ClassifierModule(ReVACNNNet(image_size=16), lr=lr), make_data(seed=seed))
    return Path(callback.run_dir)


def conv1_mosaic(w: np.ndarray) -> np.ndarray:
    """conv1 filters [out, 3, k, k] as one RGB image (each filter scaled to [0, 1] on its own)."""
    out, _, k, _ = w.shape
    cols = 8
    rows = int(np.ceil(out / cols))
    img = np.ones((rows * (k + 1), cols * (k + 1), 3))
    for i in range(out):
        f = w[i].transpose(1, 2, 0)
        f = (f - f.min()) / max(f.max() - f.min(), 1e-12)
        r, c = divmod(i, cols)
        img[r * (k + 1):r * (k + 1) + k, c * (k + 1):c * (k + 1) + k] = f
    return img


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--root", default="/tmp/revacnn-observations")
    parser.add_argument("--tag", default="", help="suffix of the output files (e.g. -30ep)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.02, 0.002], help="one run per lr")
    args = parser.parse_args(argv)
    from revacnn.recording.reader import open_run
    from revacnn_dash.analysis.observations import channel_concentration, track_observations

    root = Path(args.root)
    results = {}
    runs = {}
    for lr in args.lrs:
        name = f"lr {lr:g}"
        t = time.time()
        run_dir = train(root / name.replace(" ", "-"), lr, args.epochs)
        runs[name] = open_run(run_dir)
        results[name] = track_observations(runs[name], first="net.conv1")
        print(name, f"{time.time() - t:.0f} s", "final val_acc", results[name]["val_acc"][-1], flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = ROOT / "docs" / "img"
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    styles = dict(zip(results, ("-", "-.", "--", ":")))
    for name, res in results.items():
        style = styles[name]
        axes[0].plot(res["step"], res["val_acc"], style, label=name)
        for layer, colour in zip(("net.conv1", "net.conv2", "net.conv3"), ("C0", "C1", "C2")):
            axes[1].plot(res["step"], res["hopkins"][layer], style, color=colour, label=f"{layer}, {name}")
            axes[2].plot(res["step"], res["nn_cosine"][layer], style, color=colour)
        axes[3].plot(res["step"], res["concentration_mean"], style, color="C3", label=f"mean, {name}")
        axes[3].plot(res["step"], res["concentration_high"], style, color="C4",
                     label=f"share > 0.5, {name}")
    for ax, title in zip(axes, ("validation accuracy", "Hopkins statistic (0.5 uniform, →1 clustered)",
                                "mean nearest-neighbour cosine of filters", "conv1 single-channel concentration")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, ncol=2)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / f"analysis-observations{args.tag}.png", dpi=90)
    fig, axes = plt.subplots(1, 2 * len(runs), figsize=(3.5 * 2 * len(runs), 3.2))
    panels = []
    for name, run in runs.items():
        steps = run.snapshot_steps()
        for step in (steps[0], steps[-1]):
            w = run.snapshot(step)["arrays"]["weight/net.conv1"]
            panels.append((f"{name}, step {step}\nconcentration {channel_concentration(w).mean():.2f}", w))
    for ax, (title, w) in zip(axes, panels):
        ax.imshow(conv1_mosaic(w), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(img / f"analysis-conv1-filters{args.tag}.png", dpi=90)
    summary = {name: {k: v for k, v in res.items()} for name, res in results.items()}
    (img / f"analysis-observations{args.tag}.json").write_text(json.dumps(summary, indent=1, default=float))
    for name, res in results.items():
        print(name, json.dumps({"step": [res["step"][0], res["step"][-1]],
                                "val_acc": [res["val_acc"][1], res["val_acc"][-1]],
                                "hopkins": {k: [round(v[0], 3), round(v[-1], 3)] for k, v in res["hopkins"].items()},
                                "nn_cosine": {k: [round(v[0], 3), round(v[-1], 3)] for k, v in
                                              res["nn_cosine"].items()},
                                "concentration": [round(res["concentration_mean"][0], 3),
                                                  round(res["concentration_mean"][-1], 3)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
