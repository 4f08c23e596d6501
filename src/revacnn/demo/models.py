"""The models of the ReVACNN paper and a small residual network, plus a plain Lightning classifier wrapper."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class ReVACNNNet(nn.Module):
    """ReVACNN §4.1: conv(5×5, pad 2) → ReLU → 2×2 max-pool, three times, then a linear classifier.

    ``widths`` defaults to the paper's 16-20-20; §4.2 uses 20-20-20 and 20-20-21.
    """

    def __init__(self, widths: Sequence[int] = (16, 20, 20), in_channels: int = 3, image_size: int = 32,
                 num_classes: int = 10) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be divisible by 8 (three 2×2 pools), got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 5, padding=2)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 5, padding=2)
        self.conv3 = nn.Conv2d(widths[1], widths[2], 5, padding=2)
        side = image_size // 8
        self.fc = nn.Linear(widths[2] * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus an identity (or 1×1 conv-BN) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet: stem conv-BN-ReLU, then stages of basic blocks, global average pool, linear head.

    Module names follow torchvision's (``layer1.0.conv1``), so the hierarchy stage → block → layer is in the names.
    """

    def __init__(self, widths: Sequence[int] = (16, 32), blocks_per_stage: int = 2, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        previous = widths[0]
        for index, width in enumerate(widths):
            blocks = [BasicBlock(previous, width, stride=1 if index == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        for index, stage in enumerate(stages, start=1):
            self.add_module(f"layer{index}", stage)
        self.num_stages = len(stages)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class ClassifierModule(pl.LightningModule):
    """A plain image classifier around any ``nn.Module``: cross-entropy, SGD with momentum (or Adam/AdamW).

    Logs ``train_loss``, ``train_acc``, ``val_loss`` and ``val_acc`` — nothing revacnn-specific.
    """

    def __init__(self, net: nn.Module, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
                 optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Not prog_bar=True: Lightning would .item() such metrics at every batch end (a GPU host sync), and the
        # overhead benchmark's sync-debug run on a GPU would fail on Lightning's sync, not the callback's.
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}; use sgd, adam or adamw")
