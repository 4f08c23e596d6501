"""Gradient accumulation and modules that step several optimizers: a published step is an optimizer step.

A real Trainer with ``accumulate_grad_batches=3`` over 7 batches makes 3 optimizer steps (batches 0-2, 3-5, 6). Its
recording has one row per step, with the mean loss of the step's batches (Lightning hands the callback each batch's
loss divided by 3), the accumulated gradient, the mean activation over the step's batches, and snapshots only at
optimizer steps. A steering command that arrives between two accumulated batches waits for the next step's start.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from revacnn import ReVACNNCallback
from revacnn.callback import Schedule
from revacnn.wire.client import RunClient
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.recording.reader import open_run

from helpers import quiet_trainer, wait_for

ACCUMULATE, BATCHES = 3, 7
WINDOWS = [[0, 1, 2], [3, 4, 5], [6]]  # the batches of optimizer steps 1, 2 and 3


class AccumulationWitness(pl.Callback):
    """Per batch, with independent code: the loss (no dropout, weights fixed within a step) and conv1's channel
    means of |output|; per optimizer step, conv1's accumulated gradient; at every batch start, the lr in use."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.activations: dict[int, np.ndarray] = {}
        self.grads: dict[int, np.ndarray] = {}
        self.lr_at_batch: dict[int, float] = {}
        self._batch = -1

    def on_train_start(self, trainer, pl_module):
        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                self.activations[self._batch] = output.detach().double().abs().mean(dim=(0, 2, 3)).numpy()
        pl_module.net.conv1.register_forward_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch_idx
        self.lr_at_batch[batch_idx] = trainer.optimizers[0].param_groups[0]["lr"]
        x, y = batch
        with torch.no_grad():
            self.losses[batch_idx] = F.cross_entropy(pl_module(x), y).item()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step + 1] = pl_module.net.conv1.weight.grad.detach().double().numpy().copy()


class SendBetweenAccumulatedBatches(pl.Callback):
    """At the end of batch 0 (the first of step 1's three) sends ``set_hparams`` and waits until the run has it."""

    def __init__(self, callback: ReVACNNCallback) -> None:
        self.callback = callback
        self.client: RunClient | None = None
        self.command_id: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.client = RunClient(self.callback.connection_file)
            self.client.connect()
            self.command_id = self.client.send_command("set_hparams", {"lr": 0.01})
            wait_for(lambda: self.callback.publisher._commands, timeout=5, interval=0.01)
            assert self.callback.publisher._commands, "the command did not reach the run"

    def on_train_end(self, trainer, pl_module):
        self.client.close()


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    torch.manual_seed(2)
    data = DigitsDataModule(batch_size=16)
    callback = ReVACNNCallback(filters_every=1, snapshot_every=2)
    witness = AccumulationWitness()
    sender = SendBetweenAccumulatedBatches(callback)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=BATCHES, accumulate_grad_batches=ACCUMULATE,
                            callbacks=[callback, witness, sender],
                            default_root_dir=tmp_path_factory.mktemp("accumulated"), limit_val_batches=0)
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.05), data)
    return {"run": open_run(callback.run_dir), "witness": witness, "sender": sender}


def test_one_row_per_optimizer_step_with_the_mean_loss_of_its_batches(accumulated):
    scalars = accumulated["run"].scalars()
    np.testing.assert_array_equal(scalars["step"], [1, 2, 3])
    np.testing.assert_array_equal(scalars["batch"], [2, 5, 6])  # the batch that made the step
    losses = accumulated["witness"].losses
    expected = [np.mean([losses[batch] for batch in window]) for window in WINDOWS]
    np.testing.assert_allclose(scalars["loss"], expected, rtol=1e-5)


def test_per_filter_data_is_the_accumulated_gradient_and_the_mean_activation_of_the_steps_batches(accumulated):
    run, witness = accumulated["run"], accumulated["witness"]
    grad_sq = run.filter_series("net.conv1", "grad_sq_mean")
    activation = run.filter_series("net.conv1", "act_abs_mean")
    np.testing.assert_array_equal(grad_sq["step"], [1, 2, 3])
    for row, (step, window) in enumerate(zip((1, 2, 3), WINDOWS)):
        expected_grad_sq = (witness.grads[step].reshape(16, -1) ** 2).mean(axis=1)
        np.testing.assert_allclose(grad_sq["values"][row], expected_grad_sq, rtol=2e-4)
        expected_activation = np.mean([witness.activations[batch] for batch in window], axis=0)
        np.testing.assert_allclose(activation["values"][row], expected_activation, rtol=1e-4)


def test_snapshots_only_at_optimizer_steps(accumulated):
    assert accumulated["run"].snapshot_steps() == [1, 2]


def test_a_command_between_accumulated_batches_waits_for_the_next_step(accumulated):
    lr = accumulated["witness"].lr_at_batch
    assert [lr[batch] for batch in range(BATCHES)] == [0.05, 0.05, 0.05, 0.01, 0.01, 0.01, 0.01]
    log = accumulated["run"].steering_log()
    assert [(entry["id"], entry["step"]) for entry in log if entry.get("op") == "set_hparams"] == [
        (accumulated["sender"].command_id, 1)]


class TwoOptimizers(pl.LightningModule):
    """Manual optimization stepping two optimizers per batch: Lightning counts two optimizer steps a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = ReVACNNNet()
        self.head = nn.Linear(10, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        loss = F.cross_entropy(self.net(x), y)
        first.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.zero_grad()
        self.manual_backward(self.head(self.net(x).detach()).pow(2).mean())
        second.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.01), torch.optim.SGD(self.head.parameters(), lr=0.01)


def test_two_optimizer_steps_per_batch_still_meet_every_schedule(tmp_path):
    """Global steps go 2, 4, 6, …: a schedule of every 4 (or 3) steps is met by the batch whose steps cross it."""
    callback = ReVACNNCallback(filters_every=4, snapshot_every=3)
    trainer = quiet_trainer(max_steps=16, callbacks=[callback], default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(TwoOptimizers(), DigitsDataModule(batch_size=16))
    run = open_run(callback.run_dir)
    np.testing.assert_array_equal(run.scalars()["step"], [2, 4, 6, 8, 10, 12, 14, 16])
    np.testing.assert_array_equal(run.filter_series("net.conv1", "weight_norm")["step"], [2, 4, 8, 12, 16])
    assert run.snapshot_steps() == [2, 4, 6, 10, 12, 16]


@pytest.mark.parametrize(("previous", "step", "every", "due"), [
    (0, 1, 50, True), (1, 2, 50, False), (49, 50, 50, True), (50, 51, 50, False),   # one step a batch
    (0, 2, 4, True), (2, 4, 4, True), (4, 6, 4, False), (6, 8, 4, True),           # two steps a batch
    (5, 5, 1, False),                                                              # no step: accumulating
    (10, 11, 0, False),                                                            # turned off
])
def test_schedule_is_due_when_the_batchs_steps_include_step_one_or_a_multiple(previous, step, every, due):
    assert Schedule().due(previous, step, every) is due


class GradientsAsEachOptimizerSteps(pl.Callback):
    """Per global step after it: the gradient and weight of ``head`` and ``net.conv1`` as their own optimizer is
    about to step them (the second optimizer holds ``head``)."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        name, layer = (("head", pl_module.head) if optimizer is trainer.optimizers[1]
                       else ("net.conv1", pl_module.net.conv1))
        step = trainer.global_step + 2 - trainer.global_step % 2  # the batch's second step, the one published
        self.seen.setdefault(step, {})[name] = (layer.weight.detach().clone(), layer.weight.grad.detach().clone())


def test_with_two_optimizers_each_layer_is_measured_as_its_own_optimizer_steps_it(tmp_path):
    """Every layer's gradient was read when the first optimizer stepped: the second optimizer's layers showed the
    gradient left from the batch before (zeros at the first step)."""
    torch.manual_seed(2)
    callback, witness = ReVACNNCallback(filters_every=2, snapshot_every=0), GradientsAsEachOptimizerSteps()
    trainer = quiet_trainer(max_steps=8, callbacks=[callback, witness], default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(TwoOptimizers(), DigitsDataModule(batch_size=16))
    run = open_run(callback.run_dir)
    for name in ("head", "net.conv1"):
        grad_sq = run.filter_series(name, "grad_sq_mean")
        weight_norm = run.filter_series(name, "weight_norm")
        np.testing.assert_array_equal(grad_sq["step"], [2, 4, 6, 8])
        for row, step in enumerate(grad_sq["step"]):
            weight, grad = witness.seen[int(step)][name]
            np.testing.assert_allclose(grad_sq["values"][row], grad.pow(2).flatten(1).mean(1).numpy(), rtol=1e-5,
                                       err_msg=f"{name} at step {step}")
            np.testing.assert_allclose(weight_norm["values"][row], weight.flatten(1).norm(dim=1).numpy(), rtol=1e-5)


class GradientsBeforeAndAfterClipping(pl.Callback):
    """conv1's gradient as back-propagated (at ``on_before_optimizer_step``) and as the optimizer stepped with it
    (clipping is in place, and the gradient is zeroed only when the next step starts)."""

    def __init__(self) -> None:
        self.raw: dict[int, torch.Tensor] = {}
        self.clipped: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.raw[trainer.global_step + 1] = pl_module.net.conv1.weight.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clipped[trainer.global_step] = pl_module.net.conv1.weight.grad.detach().clone()


def test_gradients_are_published_as_back_propagated_before_clipping(tmp_path):
    """docs/protocol.md says the per-filter gradients are the loss's, read before Lightning clips them."""
    torch.manual_seed(4)
    callback, witness = ReVACNNCallback(filters_every=1, snapshot_every=0), GradientsBeforeAndAfterClipping()
    trainer = quiet_trainer(max_steps=3, gradient_clip_val=1e-3, callbacks=[callback, witness],
                            default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=16))
    series = open_run(callback.run_dir).filter_series("net.conv1", "grad_abs_mean")
    np.testing.assert_array_equal(series["step"], [1, 2, 3])
    for row, step in enumerate(series["step"].tolist()):
        raw, clipped = (grads[step].abs().flatten(1).mean(1).numpy() for grads in (witness.raw, witness.clipped))
        assert clipped.max() < 0.5 * raw.max()            # clipping was on, and changed the gradient
        np.testing.assert_allclose(series["values"][row], raw, rtol=1e-5)
