"""Issue 30, steering validation: numbers checked against the dtype that holds them, momentum below 1, filters
never rewritten into NaN/inf, and set_batch_size requests that supersede each other and report the new size."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.steering import SteeringEngine
from revacnn.steering.errors import SteeringError

from helpers import quiet_trainer
from steering_util import batch, cmd, make_optimizer, setup, snapshot, assert_same_state, step
from test_steering_callback import Script, fit


# ---------------------------------------------------------------------------------------------------- set_hparams
@pytest.mark.parametrize("opt", ["sgd", "adamw", "adam", "rmsprop"])
@pytest.mark.parametrize("field", ["lr", "weight_decay"])
def test_a_value_float32_cannot_hold_is_refused_and_nothing_changes(opt, field):
    module, optimizer, x, y, engine = setup("revacnn", opt)
    if field == "weight_decay" and opt == "adam":
        optimizer.param_groups[0]["weight_decay"] = 0.0
    before = snapshot(module, optimizer)
    ack = engine.apply(cmd("set_hparams", **{field: 1e39}))
    assert not ack["ok"] and field in ack["error"] and "float32" in ack["error"], ack
    assert_same_state(before, snapshot(module, optimizer))
    assert math.isfinite(step(module, optimizer, x, y))  # the next step does not crash


@pytest.mark.parametrize("dtype, limit", [(torch.float16, 65504.0), (torch.bfloat16, 3.3895e38)])
def test_lr_is_checked_against_half_precision_parameters(dtype, limit):
    module = ClassifierModule(ReVACNNNet()).to(dtype)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    engine = SteeringEngine(module, [optimizer])
    ack = engine.apply(cmd("set_hparams", lr=limit * 1.01))
    assert not ack["ok"] and str(dtype).removeprefix("torch.") in ack["error"], ack
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert engine.apply(cmd("set_hparams", lr=limit * 0.99))["ok"]


def test_adam_step_size_overflow_is_refused():
    """Adam steps by lr / (1 - beta1^t): 3e38 fits float32, 3e39 on the first step of a new parameter does not."""
    module, optimizer, x, y, engine = setup("revacnn", "adam")
    ack = engine.apply(cmd("set_hparams", lr=3e38))
    assert not ack["ok"] and "betas[0]" in ack["error"] and "float32" in ack["error"], ack
    assert math.isfinite(step(module, optimizer, x, y))


def test_a_huge_but_representable_sgd_lr_is_accepted_and_the_next_step_runs():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    assert engine.apply(cmd("set_hparams", lr=3e38))["ok"]
    step(module, optimizer, x, y)  # may diverge (the run's divergence guard's business), must not raise


@pytest.mark.parametrize("opt", ["sgd", "rmsprop", "adamw"])
@pytest.mark.parametrize("value", [1.0, 1.5])
def test_momentum_of_one_or_more_is_refused_for_every_optimizer(opt, value):
    module, optimizer, x, y, engine = setup("revacnn", opt)
    before = snapshot(module, optimizer)
    ack = engine.apply(cmd("set_hparams", momentum=value))
    assert not ack["ok"] and "momentum" in ack["error"] and "[0, 1)" in ack["error"], ack
    assert_same_state(before, snapshot(module, optimizer))


def test_a_scheduler_base_that_would_overflow_is_refused():
    """OneCycleLR near its end: lr is max_lr/1e4/25, so a new lr rescales max_lr by a factor 2.5e5 as well."""
    module = ClassifierModule(ReVACNNNet())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    engine = SteeringEngine(module, [optimizer], [scheduler])
    before = (dict(optimizer.param_groups[0]), list(scheduler.base_lrs))
    lr = float(optimizer.param_groups[0]["lr"])
    ack = engine.apply(cmd("set_hparams", lr=3e38 / 0.1 * lr * 10))  # fits float32; max_lr * ratio does not
    assert not ack["ok"] and "float32" in ack["error"], ack
    assert (dict(optimizer.param_groups[0]), list(scheduler.base_lrs)) == before


def test_lr_1e39_through_a_real_trainer_is_refused_naming_float32_and_training_goes_on(tmp_path):
    trainer, model, script = fit(tmp_path, {2: [("set_hparams", {"lr": 1e39}), ("set_hparams", {"momentum": 1.5})]},
                                 epochs=1, batches=6)
    assert trainer.global_step == 6
    assert [ack["status"] for ack in script.acks] == ["error", "error"], script.acks
    assert "float32" in script.acks[0]["error"] and "[0, 1)" in script.acks[1]["error"]
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == 0.05 and group["momentum"] == 0.9
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- reinit_filters
def _reinit(engine, **args):
    return engine.apply(cmd("reinit_filters", layer="net.conv2", filters=[0], **args))


def _values(fill, shape):
    return [torch.full(shape, fill, dtype=torch.float64).tolist()]


@pytest.mark.parametrize("fill", [1e39, 3e38])
def test_values_that_make_the_filter_or_output_non_finite_are_refused(fill):
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    before = snapshot(module, optimizer)
    ack = _reinit(engine, mode="values", values=_values(fill, module.net.conv2.weight.shape[1:]))
    assert not ack["ok"] and ("float32" in ack["error"] or "non-finite" in ack["error"]), ack
    assert_same_state(before, snapshot(module, optimizer))


def test_bools_are_not_numbers_in_values():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    values = _values(0.5, module.net.conv2.weight.shape[1:])
    values[0][0][0][0] = True
    before = snapshot(module, optimizer)
    ack = _reinit(engine, mode="values", values=values)
    assert not ack["ok"] and "True" in ack["error"], ack
    assert_same_state(before, snapshot(module, optimizer))


@pytest.mark.parametrize("distances", [[True, 1.0], [1.0, False]])
def test_bools_are_not_numbers_in_distances(distances):
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    ack = _reinit(engine, mode="neighbours", neighbours=[1, 2], distances=distances)
    assert not ack["ok"] and "number" in ack["error"], ack


@pytest.mark.parametrize("distances", [[1e-320], [1e-320, 1.0], [5e-324, 1e308], [1e308, 1e308]])
def test_tiny_and_huge_distances_give_a_finite_weighted_average(distances):
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    w = module.net.conv2.weight
    neighbours = [1, 2][:len(distances)]
    ack = _reinit(engine, mode="neighbours", neighbours=neighbours, distances=distances)
    assert ack["ok"], ack
    assert torch.isfinite(w).all() and torch.isfinite(module.net.conv2.bias).all()
    change = ack["changes"]["output_max_abs_change"]
    assert change is not None and math.isfinite(change)
    if len(distances) == 1 or distances[0] < distances[1] * 1e-300:  # all the weight on the nearest
        assert torch.equal(w[0], w[1])


def test_max_abs_change_is_inf_when_the_output_became_non_finite():
    a = [torch.tensor([1.0, 2.0])]
    assert SteeringEngine.max_abs_change(a, [torch.tensor([1.0, float("nan")])]) == math.inf
    assert SteeringEngine.max_abs_change(a, [torch.tensor([1.0, float("inf")])]) == math.inf
    assert SteeringEngine.max_abs_change(a, [torch.tensor([1.5, 2.0])]) == 0.5
    nan = [torch.tensor([float("nan"), 2.0])]
    assert SteeringEngine.max_abs_change(nan, [torch.tensor([float("nan"), 2.5])]) == 0.5


def test_a_structural_change_whose_output_becomes_non_finite_is_rolled_back():
    """The engine's one rule for every structural op: a change that makes the eval output non-finite is undone."""
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    before = snapshot(module, optimizer)
    old_fc = module.net.fc

    def body():  # a change of modules, as widen / insert_layer make, whose new layer overflows float32
        module.net.fc = torch.nn.Linear(old_fc.in_features, old_fc.out_features)
        with torch.no_grad():
            module.net.fc.weight.fill_(3e38)

    with pytest.raises(SteeringError, match="non-finite"):
        engine.structural("widen", body)
    assert module.net.fc is old_fc
    assert_same_state(before, snapshot(module, optimizer))


# ---------------------------------------------------------------------------------------------------- batch size
def _sizes_seen():
    seen = []

    class Sizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, len(batch[0])))

    return seen, Sizes()


def test_a_later_set_batch_size_supersedes_an_earlier_one_in_the_same_epoch(tmp_path):
    seen, sizes = _sizes_seen()
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Script(callback, {1: [("set_batch_size", {"batch_size": 16})], 3: [("set_batch_size", {"batch_size": 8})]})
    data = DigitsDataModule(batch_size=32)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=1,
                            callbacks=[callback, script, sizes], default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet()), data)
    acks = [ack for ack in script.acks if ack["op"] == "set_batch_size"]
    assert [ack["status"] for ack in acks] == ["error", "done"], acks
    assert f"superseded by command {acks[1]['id']}" in acks[0]["error"]
    assert acks[1]["result"] == {"batch_size": 8, "epoch": 1}
    assert data.batch_size == 8
    assert {size for epoch, size in seen if epoch == 1} == {8}


def test_set_batch_size_without_a_batch_size_attribute_is_refused_at_once(tmp_path):
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Script(callback, {1: [("set_batch_size", {"batch_size": 16})]})
    data = DigitsDataModule(batch_size=32)
    data.setup()
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=32)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, callbacks=[callback, script],
                            default_root_dir=tmp_path)
    trainer.fit(ClassifierModule(ReVACNNNet()), train_dataloaders=loader)
    (ack,) = [ack for ack in script.acks if ack["op"] == "set_batch_size"]
    assert ack["status"] == "error" and "'batch_size' attribute" in ack["error"], ack
    assert ack["step"] <= 2  # at once, not at the next epoch


def test_hparams_published_when_a_batch_size_takes_effect_carry_the_new_size(tmp_path):
    from conftest import Listener

    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    listener = Listener(lambda: callback.connection_file).start()
    script = Script(callback, {2: [("set_batch_size", {"batch_size": 16})]})
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0, callbacks=[callback, script],
                            default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=32))
    messages = listener.join()
    hparams = [m.body for m in messages if m.type == "hparams"]
    assert hparams[0]["batch_size"] == 32 and hparams[-1]["batch_size"] == 16, hparams


def test_ints_beyond_float64_are_refused_not_an_internal_error():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    ack = engine.apply(cmd("set_hparams", lr=10 ** 400))
    assert not ack["ok"] and "finite" in ack["error"], ack
    values = _values(0.5, module.net.conv2.weight.shape[1:])
    values[0][0][0][0] = 10 ** 400
    ack = _reinit(engine, mode="values", values=values)
    assert not ack["ok"] and "internal" not in ack["error"], ack


def test_a_batch_size_waiting_when_training_ends_gets_a_final_ack_and_is_put_back(tmp_path):
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Script(callback, {2: [("set_batch_size", {"batch_size": 16})]})
    data = DigitsDataModule(batch_size=32)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0, callbacks=[callback, script],
                            default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet()), data)
    (ack,) = [ack for ack in script.acks if ack["op"] == "set_batch_size"]
    assert ack["status"] == "error" and "training ended" in ack["error"], ack
    assert data.batch_size == 32
