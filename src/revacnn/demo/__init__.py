"""Demo models and data used by the examples, the tests and the benchmarks.

Importing this package imports torch and Lightning (the training side).
"""

from revacnn.demo.data import CIFAR10Folder, DigitsDataModule, load_cifar10_folder, write_cifar10_batch
from revacnn.demo.models import ReVACNNNet, SmallResNet, ClassifierModule

__all__ = [
    "CIFAR10Folder",
    "ClassifierModule",
    "DigitsDataModule",
    "ReVACNNNet",
    "SmallResNet",
    "load_cifar10_folder",
    "write_cifar10_batch",
]
