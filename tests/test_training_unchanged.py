"""Watching a run does not change it: with the callback measuring every step, taking snapshots (probe passes) and
predicting the kept validation images, the model trains to the same weights, bit for bit, as without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet, SmallResNet

from helpers import quiet_trainer


class Dropout(ClassifierModule):
    """Draws a dropout mask from torch's generator at every training forward."""

    def forward(self, x):
        return self.net(F.dropout(x, 0.2, self.training))


class NoisyForward(ClassifierModule):
    """Samples noise in every forward, in eval mode too (as a VAE's reparametrisation does): the callback's own
    forwards draw from the generator."""

    def forward(self, x):
        return self.net(x + 0.1 * torch.randn_like(x))


class WithBatchNorm(ClassifierModule):
    """The demo's ResNet: BatchNorm running statistics change in any training-mode forward."""

    def __init__(self, _net) -> None:
        super().__init__(SmallResNet())


def train(module_class, callbacks, root) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    module = module_class(ReVACNNNet())
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=callbacks,
                            default_root_dir=root)
    trainer.fit(module, DigitsDataModule(batch_size=16))  # shuffled: each epoch draws its order from the generator
    return module.state_dict()


@pytest.mark.parametrize("module_class", [ClassifierModule, Dropout, NoisyForward, WithBatchNorm])
def test_the_callback_leaves_the_training_as_it_is_without_it(tmp_path, module_class):
    """Iterating the validation data for the kept images drew a DataLoader seed from torch's generator, so every
    later shuffle and dropout mask differed from the run without the callback."""
    callback = ReVACNNCallback(filters_every=1, snapshot_every=2, probe_images=4, val_subset=50)
    watched = train(module_class, [callback], tmp_path / "watched")
    alone = train(module_class, [], tmp_path / "alone")
    assert callback.run_dir is not None and (callback.run_dir / "connection.json").exists()
    for name, expected in alone.items():
        torch.testing.assert_close(watched[name], expected, rtol=0, atol=0, msg=name)
