"""Restore points without a Trainer: capture and restore of a model and its optimizer after structural operations
(the engine's, applied directly), from memory and from the safetensors file the spill thread wrote; the caps."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from revacnn.steering.restore import capture, restore
from revacnn.steering.restore_store import RestorePolicy, RestoreStore

from steering_util import assert_same_state, cmd, setup, step


def snapshot(module, optimizer):
    """Copies (``optimizer.state_dict()`` holds the live state tensors)."""
    return ({k: v.clone() for k, v in module.state_dict().items()}, copy.deepcopy(optimizer.state_dict()))


def structure(module):
    return [(name, type(m).__name__) for name, m in module.named_modules()]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("spilled", [False, True])
def test_restore_after_several_structural_changes(tmp_path, opt, spilled):
    module, optimizer, x, y, engine = setup("resnet", opt)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scheduler.step()
    saved, layout = snapshot(module, optimizer), structure(module)
    saved_sched = copy.deepcopy(scheduler.state_dict())
    store = RestoreStore(RestorePolicy(ram_points=0 if spilled else 4), tmp_path / "spill")
    point = capture(1, 3, 0, "command", module, [optimizer], [scheduler])
    store.add(point)
    store.add(capture(2, 3, 0, "periodic", module, [optimizer], [scheduler]))   # the newest stays in memory
    if spilled:
        store.wait_spilled()
        assert point.tensors is None and point.file and (tmp_path / "spill").exists()
    torch.manual_seed(7)
    for command in (cmd("widen", layer="net.layer2.0.conv1", count=2), cmd("widen", layer="net.conv1", count=2),
                    cmd("insert_layer", after="net.conv1"),
                    cmd("remove_filters", layer="net.layer1.0.conv1", filters=[1, 3])):
        assert engine.apply(command)["ok"], command
    step(module, optimizer, x, y)
    scheduler.step()
    assert structure(module) != layout
    restore(point, store.tensors(point), module, [optimizer], [scheduler])
    assert structure(module) == layout
    assert_same_state(snapshot(module, optimizer), saved)
    assert scheduler.state_dict() == saved_sched
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in params] == [id(p) for p in module.parameters()]
    # restoring again (the point is not consumed) and training from it gives the same as training from the start
    step(module, optimizer, x, y)
    after_one = snapshot(module, optimizer)
    restore(point, store.tensors(point), module, [optimizer], [scheduler])
    step(module, optimizer, x, y)
    assert_same_state(snapshot(module, optimizer), after_one)
    store.close()


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    model = Tied()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    point = capture(1, 0, 0, "start", model, [optimizer], [])
    restore(point, point.tensors, model, [optimizer], [])
    assert model.a.weight is model.b.weight
    assert len(optimizer.param_groups[0]["params"]) == 3


def test_caps_drop_the_oldest_and_keep_ram_bounded(tmp_path):
    module, optimizer, *_ = setup("revacnn", "sgd")
    one = capture(0, 0, 0, "periodic", module, [optimizer], []).nbytes
    store = RestoreStore(RestorePolicy(ram_points=2, ram_bytes=10 * one, max_points=4, disk_bytes=1 * one),
                         tmp_path / "spill")
    for i in range(1, 7):
        store.add(capture(i, i, 0, "periodic", module, [optimizer], []))
        store.wait_spilled()
    assert sorted(store.points) == [4, 5, 6]        # at most one point's bytes on disk: 4; 5 and 6 in memory
    assert store.ram_usage() == (2, 2 * one)
    assert store.disk_usage() == (1, one)
    assert len(list((tmp_path / "spill").iterdir())) == 1
    store.close()
    assert not (tmp_path / "spill").exists()


def test_a_point_over_the_memory_cap_goes_to_disk_even_the_newest(tmp_path):
    """A large model's points are not held in memory (they would be most of the callback's RSS): the newest is
    spilled too, and restores from its file; without a spill directory the newest stays in memory."""
    module, optimizer, *_ = setup("revacnn", "sgd")
    saved = snapshot(module, optimizer)
    point = capture(1, 1, 0, "periodic", module, [optimizer], [])
    store = RestoreStore(RestorePolicy(ram_bytes=point.nbytes - 1), tmp_path / "spill")
    store.add(point)
    store.wait_spilled()
    assert store.ram_usage() == (0, 0) and store.disk_usage() == (1, point.nbytes)
    assert point.tensors is None and Path(point.file).exists()
    restore(point, store.tensors(point), module, [optimizer], [])
    assert_same_state(snapshot(module, optimizer), saved)
    store.close()
    nowhere = RestoreStore(RestorePolicy(ram_bytes=point.nbytes - 1), None)
    nowhere.add(capture(2, 1, 0, "periodic", module, [optimizer], []))
    assert nowhere.ram_usage() == (1, point.nbytes)
