"""Undo through a real Trainer and the wire: every changing command is taken back bitwise (model, requires_grad,
optimizer and scheduler state, step), repeatedly, and a diverged run trains on with a finite loss after ``undo``."""

from __future__ import annotations

import math

import pytest
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import DigitsDataModule, ReVACNNNet

from helpers import quiet_trainer
from undo_support import Observer, ScheduledClassifier, Sequence, same, steered_batches


def run(tmp_path, commands, batches=12, epochs=2, gap=3, **callback_args):
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False, **callback_args)
    before, after = Observer(callback), Observer(callback)
    script = Sequence(callback, commands, gap=gap)
    torch.manual_seed(0)
    model = ScheduledClassifier(ReVACNNNet(), lr=0.05)
    trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=batches, limit_val_batches=0,
                            callbacks=[before, callback, after, script], default_root_dir=tmp_path,
                            num_sanity_val_steps=0)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return trainer, model, script, before, after


def final(script, op):
    return [ack for ack in script.acks if ack["op"] == op]


def test_undo_after_divergence_restores_bitwise_and_training_recovers(tmp_path):
    # momentum ≥ 1 is refused since issue 30; an lr this large diverges the demo CNN within a few steps
    trainer, model, script, before, after = run(tmp_path, [("set_hparams", {"lr": 1e4}), ("undo", {})], gap=4,
                                                batches=14)
    assert [a["status"] for a in script.acks] == ["done", "done"], script.acks
    changed, undone = steered_batches(before, after)
    diverged = script.losses[changed:undone]
    assert any(not math.isfinite(loss) or loss > 1e3 for loss in diverged), diverged
    assert same(after.states[undone], before.states[changed])   # model, optimizer, scheduler, step: bitwise
    result = final(script, "undo")[0]["result"]
    assert result["step"] == before.states[changed]["step"]
    assert [c["op"] for c in result["taken_back"]] == ["set_hparams"]
    assert result["steps_taken_back"] == undone - changed
    assert all(math.isfinite(loss) and loss < 5 for loss in script.losses[undone:]), script.losses[undone:]
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1


@pytest.mark.parametrize("op,args", [
    ("widen", {"layer": "net.conv2", "count": 3}),
    ("remove_filters", {"layer": "net.conv2", "filters": [0, 5]}),
    ("insert_layer", {"after": "net.conv1"}),
    ("remove_layer", {"layer": "net.conv3"}),
    ("reinit_filters", {"layer": "net.conv1", "filters": [1, 2], "mode": "random", "seed": 3}),
    ("freeze", {"layers": ["net.conv1"]}),
    ("freeze", {"layer": "net.conv2", "filters": [1, 4]}),
])
def test_undo_of_each_change_restores_bitwise(tmp_path, op, args):
    trainer, model, script, before, after = run(tmp_path, [(op, args), ("undo", {})])
    assert [a["status"] for a in script.acks] == ["done", "done"], script.acks
    changed, undone = steered_batches(before, after)
    assert not same(after.states[changed], before.states[changed])
    assert same(after.states[undone], before.states[changed])
    # and it trains on from there: the optimizer holds exactly the model's parameters, which move
    params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]
    assert not same(after.states[-1]["weights"], after.states[undone]["weights"])
    if op == "freeze" and "layers" in args:
        assert model.net.conv1.weight.requires_grad   # unfrozen with the undo
        assert trainer.callbacks[1]._frozen_state() == {"layers": {}, "filters": {}}


def test_undo_twice_takes_back_both_changes_in_turn(tmp_path):
    commands = [("widen", {"layer": "net.conv2", "count": 2}), ("set_hparams", {"lr": 0.01, "momentum": 0.5}),
                ("undo", {}), ("undo", {}), ("undo", {})]
    trainer, model, script, before, after = run(tmp_path, commands, batches=12, epochs=3)
    assert [a["status"] for a in script.acks] == ["done"] * 4 + ["error"], script.acks
    assert "no change to take back" in script.acks[-1]["error"]
    widened, hparams, first, second = steered_batches(before, after)
    assert same(after.states[first], before.states[hparams])
    assert same(after.states[second], before.states[widened])
    assert model.net.conv2.weight.shape[0] == 20
    assert [c["op"] for c in script.acks[3]["result"]["taken_back"]] == ["widen"]
    assert trainer.callbacks[1].changelog == []


def test_a_refused_command_leaves_no_restore_point_to_undo(tmp_path):
    trainer, _, script, before, after = run(tmp_path, [("widen", {"layer": "net.nope", "count": 1}), ("undo", {})])
    assert [a["status"] for a in script.acks] == ["error", "error"]
    assert "no change to take back" in script.acks[1]["error"]
    assert steered_batches(before, after) == []


def test_undo_is_refused_without_restore_points(tmp_path):
    _, _, script, _, _ = run(tmp_path, [("widen", {"layer": "net.conv2", "count": 1}), ("undo", {})],
                             restore_points=None)
    assert [a["status"] for a in script.acks] == ["done", "error"]
    assert "restore points are off" in script.acks[1]["error"]


def test_undo_of_set_batch_size_puts_the_attribute_back(tmp_path):
    trainer, model, script, before, after = run(tmp_path, [("set_batch_size", {"batch_size": 16}), ("undo", {})],
                                                batches=6, epochs=4, gap=8)
    acks = {a["op"]: a for a in script.acks}
    assert acks["set_batch_size"]["status"] == "done" and acks["undo"]["status"] == "done", script.acks
    assert [c["op"] for c in acks["undo"]["result"]["taken_back"]] == ["set_batch_size"]
    assert trainer.datamodule.batch_size == 32
    assert trainer.train_dataloader.batch_size == 32   # the loader followed at the next epoch
