"""Demo data: sklearn digits and the CIFAR-10 binary-folder loader, on small files made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from revacnn.demo import CIFAR10Folder, DigitsDataModule, load_cifar10_folder, write_cifar10_batch
from revacnn.demo.data import CIFAR10_TRAIN_FILES


def make_cifar_folder(folder, per_file=7, seed=0):
    rng = np.random.default_rng(seed)
    written = {}
    for name in (*CIFAR10_TRAIN_FILES, "test_batch.bin"):
        images = rng.integers(0, 256, size=(per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file, dtype=np.uint8)
        write_cifar10_batch(folder / name, images, labels)
        written[name] = (images, labels)
    return written


def test_cifar10_folder_reads_back_the_exact_pixels_and_labels(tmp_path):
    written = make_cifar_folder(tmp_path)
    images, labels = load_cifar10_folder(tmp_path, train=True)
    expected_images = np.concatenate([written[name][0] for name in CIFAR10_TRAIN_FILES])
    expected_labels = np.concatenate([written[name][1] for name in CIFAR10_TRAIN_FILES])
    assert images.shape == (35, 3, 32, 32) and images.dtype == torch.float32
    np.testing.assert_array_equal(labels.numpy(), expected_labels)
    np.testing.assert_allclose(images.numpy(), (expected_images / 255.0 - 0.5) / 0.5, atol=1e-6)
    test_images, test_labels = load_cifar10_folder(tmp_path, train=False, limit=3)
    np.testing.assert_array_equal(test_labels.numpy(), written["test_batch.bin"][1][:3])
    assert test_images.shape == (3, 3, 32, 32)


def test_cifar10_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
        load_cifar10_folder(tmp_path)
    make_cifar_folder(tmp_path)
    with open(tmp_path / "data_batch_3.bin", "ab") as handle:
        handle.write(b"\0" * 10)
    with pytest.raises(ValueError, match="whole number of 3073-byte records"):
        load_cifar10_folder(tmp_path)


def test_cifar10_datamodule_batches(tmp_path):
    make_cifar_folder(tmp_path, per_file=20)
    data = CIFAR10Folder(tmp_path, batch_size=8)
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)
    assert len(data.val_set) == 20


def test_digits_split_is_fixed_and_upsampled():
    first, second = DigitsDataModule(), DigitsDataModule()
    first.setup()
    second.setup()
    assert len(first.train_set) == 1497 and len(first.val_set) == 300
    assert torch.equal(first.val_set.tensors[0], second.val_set.tensors[0])
    assert first.val_set.tensors[0].shape[1:] == (3, 32, 32)
    assert float(first.val_set.tensors[0].min()) >= -1.0 and float(first.val_set.tensors[0].max()) <= 1.0
