"""The names a user knows reach the layer they mean (issue 27): under ``torch.compile`` (``_orig_mod`` segments),
after ``insert_layer`` (which keeps its anchor's name), and after a checkpoint of an earlier version whose
``insert_layer`` moved the layer into a Sequential (``conv2`` → ``conv2.0``). One resolution
(``steering.names.resolve_layer``) serves every operation, and the ack says which module a name stood for."""

from __future__ import annotations

import pytest
import torch
from steering_util import MOMENT, assert_optimizer_consistent, batch, build, cmd, eval_out, make_optimizer, step
from torch import nn

from revacnn.steering import SteeringEngine


def compiled_setup(opt: str = "sgd"):
    """The demo model with ``model.net = torch.compile(model.net)``: the real torch.compile, with the "eager" backend
    (the same OptimizedModule and ``_orig_mod`` names; inductor takes ~35 s per graph on this CPU)."""
    module = build("revacnn")
    module.net = torch.compile(module.net, backend="eager")
    assert "net._orig_mod.conv2" in dict(module.named_modules()) and "net.conv2" not in dict(module.named_modules())
    optimizer = make_optimizer(module, opt)
    x, y = batch()
    for _ in range(2):
        step(module, optimizer, x, y)
    return module, optimizer, x, y, SteeringEngine(module, [optimizer], example_input=x)


def test_the_user_names_of_a_compiled_net_reach_its_layers():
    """Before: ``widen net.conv2`` was refused with "net.conv2 is not used in forward on the example input"."""
    module, optimizer, x, y, engine = compiled_setup()
    conv2 = module.net._orig_mod.conv2
    expected = eval_out(module, x)
    ack = engine.apply(cmd("widen", layer="net.conv2", count=2))
    assert ack["ok"], ack["error"]
    assert ack["changes"]["resolved"] == {"net.conv2": "net._orig_mod.conv2"}
    assert ack["changes"]["layer"] == "net._orig_mod.conv2" and conv2.out_channels == 22
    assert torch.allclose(eval_out(module, x), expected, atol=1e-5)       # net2net: the function is kept
    assert engine.changelog[-1]["layer"] == "net._orig_mod.conv2"         # the real name: replay splices it

    ack = engine.apply(cmd("remove_filters", layer="net.conv3", filters=[0]))
    assert ack["ok"], ack["error"]
    ack = engine.apply(cmd("reinit_filters", layer="net.conv1", filters=[1], mode="random"))
    assert ack["ok"], ack["error"]
    assert ack["changes"]["resolved"] == {"net.conv1": "net._orig_mod.conv1"}
    ack = engine.apply(cmd("freeze", layers=["net.fc"]))
    assert ack["ok"] and ack["changes"]["frozen"] == {"net._orig_mod.fc": "all"}, ack
    assert not module.net._orig_mod.fc.weight.requires_grad
    before_insert = eval_out(module, x)
    ack = engine.apply(cmd("insert_layer", after="net.conv2"))
    assert ack["ok"], ack["error"]
    assert torch.equal(eval_out(module, x), before_insert)   # compiled, the hook runs the new (identity) conv
    assert ack["changes"]["anchor"] == "net._orig_mod.conv2"
    assert ack["changes"]["inserted"] == ["net._orig_mod.conv2.inserted.conv"]
    ack = engine.apply(cmd("remove_layer", layer="net.conv2.inserted.conv"))  # the inserted conv, by the user's name
    assert ack["ok"], ack["error"]
    assert ack["changes"]["resolved"] == {"net.conv2.inserted.conv": "net._orig_mod.conv2.inserted.conv"}
    assert ack["changes"]["undid_insertion"] and not hasattr(module.net._orig_mod.conv2, "inserted")
    step(module, optimizer, x, y)
    assert_optimizer_consistent(module, optimizer)


def test_unknown_names_stay_refused_and_the_real_names_still_work():
    module, optimizer, x, y, engine = compiled_setup()
    ack = engine.apply(cmd("widen", layer="net.conv9", count=1))
    assert not ack["ok"] and "unknown layer 'net.conv9'" in ack["error"]
    ack = engine.apply(cmd("widen", layer="net._orig_mod.conv2", count=1))
    assert ack["ok"], ack["error"]
    assert "resolved" not in ack["changes"]


class Holder(nn.Module):
    """A wrapper that holds its module as ``_orig_mod``, as torch.compile's OptimizedModule does."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_a_name_that_could_mean_two_modules_is_refused_with_the_names_to_use():
    """``a.b.c`` names no module, and two through ``_orig_mod``: the refusal says which names to use."""
    module = nn.Module()
    module.a = Holder(nn.Module())
    module.a._orig_mod.b = nn.Module()
    module.a._orig_mod.b.c = nn.Conv2d(3, 4, 3)
    module.a.b = Holder(nn.Module())
    module.a.b._orig_mod.c = nn.Conv2d(3, 4, 3)
    engine = SteeringEngine(module, [torch.optim.SGD(module.parameters(), lr=0.1)])
    ack = engine.apply(cmd("freeze", layers=["a.b.c"]))
    assert not ack["ok"]
    assert ack["error"] == ("freeze: layer name 'a.b.c' is ambiguous: it can mean any of a._orig_mod.b.c, "
                            "a.b._orig_mod.c (torch.compile's _orig_mod); give one of these names")
    ack = engine.apply(cmd("freeze", layers=["a.b._orig_mod.c"]))
    assert ack["ok"], ack["error"]
    assert not module.a.b._orig_mod.c.weight.requires_grad and module.a._orig_mod.b.c.weight.requires_grad


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_insert_layer_keeps_the_anchor_and_its_name(opt):
    """Before: ``widen net.conv2`` after ``insert_layer after net.conv2`` was refused: "net.conv2 is a Sequential".
    Now the anchor stays where it was (same object, name and type); the new layer hangs on it as ``inserted``."""
    module = build("revacnn")
    optimizer = make_optimizer(module, opt)
    x, y = batch()
    step(module, optimizer, x, y)
    engine = SteeringEngine(module, [optimizer], example_input=x)
    anchor = module.net.conv2
    ack = engine.apply(cmd("insert_layer", after="net.conv2"))
    assert ack["ok"], ack["error"]
    assert "renamed" not in ack["changes"] and module.net.conv2 is anchor and type(anchor) is nn.Conv2d
    new = module.net.conv2.inserted.conv

    ack = engine.apply(cmd("widen", layer="net.conv2", count=3))
    assert ack["ok"], ack["error"]
    assert "resolved" not in ack["changes"]
    assert ack["changes"]["layer"] == "net.conv2" and anchor.out_channels == 23
    assert ack["changes"]["readers"] == ["net.conv2.inserted.conv"] and new.in_channels == 23

    ack = engine.apply(cmd("freeze", layers=["net.conv2"]))
    assert ack["ok"], ack["error"]
    assert ack["changes"]["frozen"] == {"net.conv2": "all"}
    assert not anchor.weight.requires_grad and not anchor.bias.requires_grad
    assert all(p.requires_grad for p in new.parameters())   # only the anchor, not the layer inserted after it
    own = {"weight": anchor.weight.detach().clone(), "bias": anchor.bias.detach().clone()}
    new_before = new.weight.detach().clone()
    state = {n: optimizer.state[p][MOMENT[opt]].clone() for n, p in anchor.named_parameters(recurse=False)
             if p in optimizer.state}
    step(module, optimizer, x, y)
    assert torch.equal(anchor.weight, own["weight"]) and torch.equal(anchor.bias, own["bias"])
    assert all(torch.equal(optimizer.state[p][MOMENT[opt]], state[n])
               for n, p in anchor.named_parameters(recurse=False) if n in state)
    assert not torch.equal(new.weight, new_before)

    ack = engine.apply(cmd("unfreeze", layers=["net.conv2"]))
    assert ack["ok"] and ack["changes"]["frozen"] == {}, ack
    assert anchor.weight.requires_grad and anchor.bias.requires_grad
    ack = engine.apply(cmd("freeze", layer="net.conv2", filters=[0]))
    assert ack["ok"] and ack["changes"]["frozen"] == {"net.conv2": [0]}, ack

    # a second insert_layer after the same name goes after the end of what was inserted there
    ack = engine.apply(cmd("insert_layer", after="net.conv2"))
    assert ack["ok"], ack["error"]
    assert ack["changes"]["anchor"] == "net.conv2.inserted.conv"
    assert ack["changes"]["inserted"] == ["net.conv2.inserted.conv.inserted.conv"]
    ack = engine.apply(cmd("remove_filters", layer="net.conv2", filters=[1]))
    assert ack["ok"], ack["error"]
    assert "resolved" not in ack["changes"] and anchor.out_channels == 22 and new.in_channels == 22
    step(module, optimizer, x, y)
    assert_optimizer_consistent(module, optimizer)


def test_the_old_name_resolves_after_a_checkpoint_of_an_earlier_version_replays():
    """A change log of an earlier version, whose insert_layer moved the anchor into a Sequential, replays that way,
    and the old name then reaches the anchor (``conv2`` → ``conv2.0``)."""
    from revacnn.steering import replay_changelog

    x, _ = batch()
    changelog = [{"op": "insert_layer", "anchor": "net.conv2", "like": "net.conv2", "relu": True,
                  "batchnorm": False}]
    resumed = replay_changelog(build("revacnn"), changelog)
    assert isinstance(resumed.net.conv2, nn.Sequential) and isinstance(resumed.net.conv2[2], nn.Conv2d)
    engine2 = SteeringEngine(resumed, [make_optimizer(resumed, "sgd")], example_input=x)
    engine2.changelog = list(changelog)
    ack = engine2.apply(cmd("widen", layer="net.conv2", count=1))
    assert ack["ok"] and ack["changes"]["resolved"] == {"net.conv2": "net.conv2.0"}, ack
