"""Data for the demo: sklearn's digits (shipped with scikit-learn) and CIFAR-10 from a local folder.

CIFAR-10 is read from the *binary* distribution (``cifar-10-batches-bin``: ``data_batch_1.bin`` … ``data_batch_5.bin``
and ``test_batch.bin``, records of 1 label byte + 3072 pixel bytes, channel-major). The python distribution is a set
of pickles; we never unpickle files, so it is not supported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def digits_tensors(image_size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 8×8 digits, scaled to [0, 1], bilinearly upsampled and repeated over ``channels``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    return images.repeat(1, channels, 1, 1).contiguous(), torch.from_numpy(digits.target.astype(np.int64))


class DigitsDataModule(pl.LightningDataModule):
    """sklearn's digits as a 10-class image task: a fixed, seeded split into 1,497 train and 300 validation images."""

    def __init__(self, batch_size: int = 32, image_size: int = 32, channels: int = 3, val_size: int = 300,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool | None = None) -> None:
        super().__init__()
        # Pinned batches make the host→GPU copy asynchronous; the default pins them when there is a GPU.
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.batch_size = batch_size
        self.image_size = image_size
        self.channels = channels
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = digits_tensors(self.image_size, self.channels)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val, train = order[: self.val_size], order[self.val_size :]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers, pin_memory=self.pin_memory)


def load_cifar10_folder(folder: str | Path, train: bool = True, limit: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 binary batches from ``folder`` into float images normalised to [-1, 1] and int64 labels.

    Raises ``FileNotFoundError`` naming the missing files, and ``ValueError`` for a file whose size is not a whole
    number of records or whose labels are outside 0–9.
    """
    folder = Path(folder)
    names = CIFAR10_TRAIN_FILES if train else (CIFAR10_TEST_FILE,)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 binary files missing in {folder}: {', '.join(missing)} "
                                "(expected the 'cifar-10-batches-bin' distribution)")
    chunks = []
    for name in names:
        raw = np.fromfile(folder / name, dtype=np.uint8)
        if raw.size % CIFAR10_RECORD_BYTES:
            raise ValueError(f"{folder / name}: {raw.size} bytes is not a whole number of "
                             f"{CIFAR10_RECORD_BYTES}-byte records")
        chunks.append(raw.reshape(-1, CIFAR10_RECORD_BYTES))
    records = np.concatenate(chunks)
    if limit is not None:
        records = records[:limit]
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise ValueError(f"CIFAR-10 labels must be 0–9, found {labels.max()}")
    images = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return torch.from_numpy((images - 0.5) / 0.5), torch.from_numpy(labels)


def write_cifar10_batch(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write uint8 ``images`` (N×3×32×32) and ``labels`` (N) as one CIFAR-10 binary batch file."""
    images = np.asarray(images, dtype=np.uint8).reshape(len(labels), -1)
    records = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], images], axis=1)
    records.tofile(str(path))


class CIFAR10Folder(pl.LightningDataModule):
    """CIFAR-10 from a local ``cifar-10-batches-bin`` folder (nothing is downloaded)."""

    def __init__(self, folder: str | Path, batch_size: int = 64, train_limit: int | None = None,
                 num_workers: int = 0, pin_memory: bool | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.batch_size = batch_size
        self.train_limit = train_limit
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = TensorDataset(*load_cifar10_folder(self.folder, train=True, limit=self.train_limit))
            self.val_set = TensorDataset(*load_cifar10_folder(self.folder, train=False))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers, pin_memory=self.pin_memory)
