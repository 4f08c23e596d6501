"""freeze / unfreeze: frozen weights and their optimizer state stay bitwise unchanged while the rest trains."""

from __future__ import annotations

import pytest
import torch
from steering_util import MODELS, OPTIMIZERS, assert_optimizer_consistent, cmd, setup, step

LAYERS = {"revacnn": ["net.conv2", "net.fc"], "resnet": ["net.layer1.0.conv1", "net.layer1.0.bn1"]}


def _params(module, names):
    return {f"{n}.{k}": p for n in names for k, p in module.get_submodule(n).named_parameters()}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("distributed", [False, True])
def test_freeze_layers_bitwise(kind, opt, distributed):
    module, optimizer, x, y, engine = setup(kind, opt, distributed=distributed)
    names = LAYERS[kind]
    ack = engine.apply(cmd("freeze", layers=names))
    assert ack["ok"], ack["error"]
    assert engine.frozen() == {n: "all" for n in names}
    frozen = _params(module, names)
    for p in frozen.values():  # single device saves backward compute; DDP must keep requires_grad
        assert p.requires_grad is distributed
    saved = {n: p.detach().clone() for n, p in frozen.items()}
    saved_state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in frozen.items()}
    others = {n: p.detach().clone() for n, p in module.named_parameters() if n not in frozen}
    for _ in range(4):
        step(module, optimizer, x, y)
    for n, p in frozen.items():
        assert torch.equal(p, saved[n]), n
        for k, v in saved_state[n].items():
            assert torch.equal(optimizer.state[p][k], v), (n, k)
    changed = [n for n, p in module.named_parameters() if n in others and not torch.equal(p, others[n])]
    assert len(changed) == len(others)  # everything else moved
    assert_optimizer_consistent(module, optimizer)

    ack = engine.apply(cmd("unfreeze", layers=names))
    assert ack["ok"] and engine.frozen() == {}
    assert all(p.requires_grad for p in frozen.values())
    step(module, optimizer, x, y)
    assert all(not torch.equal(p, saved[n]) for n, p in frozen.items())


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_freeze_single_filters_bitwise(kind, opt):
    module, optimizer, x, y, engine = setup(kind, opt)
    layer = "net.conv2" if kind == "revacnn" else "net.layer1.0.conv1"
    rows = [0, 3, 7]
    ack = engine.apply(cmd("freeze", layer=layer, filters=rows))
    assert ack["ok"], ack["error"]
    assert engine.frozen() == {layer: rows}
    conv = module.get_submodule(layer)
    params = [p for p in (conv.weight, conv.bias) if p is not None]
    saved = [p.detach().clone() for p in params]
    saved_state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
    for _ in range(4):
        step(module, optimizer, x, y)
    free = [i for i in range(conv.out_channels) if i not in rows]
    for p, s, st in zip(params, saved, saved_state):
        assert torch.equal(p[rows], s[rows])
        assert not torch.equal(p[free], s[free])
        for k, v in st.items():
            if v.dim() > 0:
                assert torch.equal(optimizer.state[p][k][rows], v[rows]), k
                assert not torch.equal(optimizer.state[p][k][free], v[free]), k
    assert engine.apply(cmd("unfreeze", layer=layer, filters=[0, 3, 7]))["ok"]
    assert engine.frozen() == {}
    step(module, optimizer, x, y)
    assert not torch.equal(conv.weight[rows], saved[0][rows])


def test_freeze_filters_before_first_step_keeps_rows_and_zero_state():
    from steering_util import build, make_optimizer, batch
    from revacnn.steering import SteeringEngine
    module = build("revacnn")
    optimizer = make_optimizer(module, "adamw")
    x, y = batch()
    engine = SteeringEngine(module, [optimizer], example_input=x)
    assert engine.apply(cmd("freeze", layer="net.conv1", filters=[1]))["ok"]
    w = module.net.conv1.weight
    saved = w.detach().clone()
    step(module, optimizer, x, y)
    step(module, optimizer, x, y)
    assert torch.equal(w[1], saved[1]) and not torch.equal(w[0], saved[0])
    assert torch.equal(optimizer.state[w]["exp_avg"][1], torch.zeros_like(w[1]))


def test_freeze_filters_follow_widen_and_remove():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    assert engine.apply(cmd("freeze", layer="net.conv2", filters=[2, 5]))["ok"]
    assert engine.apply(cmd("remove_filters", layer="net.conv2", filters=[0, 5]))["ok"]
    assert engine.frozen() == {"net.conv2": [1]}  # old 2 is now 1; old 5 is gone
    assert engine.apply(cmd("widen", layer="net.conv2", count=2))["ok"]
    assert engine.frozen() == {"net.conv2": [1]}
    w = module.net.conv2.weight
    saved = w.detach().clone()
    step(module, optimizer, x, y)
    assert torch.equal(w[1], saved[1])


def test_frozen_layer_stays_frozen_through_insert_layer_and_widen():
    """The layer inserted after a frozen one trains: a freeze is the layer's own parameters."""
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    assert engine.apply(cmd("freeze", layers=["net.conv2"]))["ok"]
    assert engine.apply(cmd("insert_layer", after="net.conv2"))["ok"]
    assert engine.frozen() == {"net.conv2": "all"}
    assert module.net.conv2.inserted.conv.weight.requires_grad
    assert engine.apply(cmd("widen", layer="net.conv2", count=1))["ok"]
    w = module.net.conv2.weight
    assert not w.requires_grad
    saved = w.detach().clone()
    step(module, optimizer, x, y)
    assert torch.equal(w, saved)
    assert_optimizer_consistent(module, optimizer)


def test_freeze_works_with_unsupported_optimizer_but_structural_op_is_refused():
    from steering_util import build, batch
    from revacnn.steering import SteeringEngine
    module = build("revacnn")
    optimizer = torch.optim.Adagrad(module.parameters(), lr=0.01)
    x, y = batch()
    step(module, optimizer, x, y)
    engine = SteeringEngine(module, [optimizer], example_input=x)
    assert engine.apply(cmd("freeze", layers=["net.conv1"]))["ok"]
    saved = module.net.conv1.weight.detach().clone()
    step(module, optimizer, x, y)
    assert torch.equal(module.net.conv1.weight, saved)
    ack = engine.apply(cmd("widen", layer="net.conv2", count=1))
    assert not ack["ok"] and "Adagrad is not supported" in ack["error"]


def test_close_removes_hooks():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    assert engine.apply(cmd("freeze", layer="net.conv1", filters=[0]))["ok"]
    engine.close()
    w = module.net.conv1.weight
    saved = w.detach().clone()
    step(module, optimizer, x, y)
    assert not torch.equal(w[0], saved[0])


def test_unfreezing_a_layer_the_module_froze_makes_it_train():
    """A layer frozen by the user's own code (``requires_grad=False``, a fine-tuning backbone) was answered "done,
    were_not_frozen" and stayed frozen. It now trains when its parameters are in the optimizer; otherwise, and under
    DDP, the command is refused and nothing changes."""
    from steering_util import batch, build, make_optimizer

    module = build("revacnn")
    for param in module.net.conv1.parameters():
        param.requires_grad_(False)
    optimizer = make_optimizer(module, "sgd")      # over every parameter, the frozen ones too
    x, y = batch()
    step(module, optimizer, x, y)
    from revacnn.steering import SteeringEngine

    engine = SteeringEngine(module, [optimizer], example_input=x)
    before = module.net.conv1.weight.detach().clone()
    ack = engine.apply(cmd("unfreeze", layers=["net.conv1", "net.conv2"]))
    assert ack["ok"], ack["error"]
    assert ack["changes"]["were_frozen_by_the_module"] == ["net.conv1"]
    assert ack["changes"]["were_not_frozen"] == ["net.conv2"]
    step(module, optimizer, x, y)
    assert not torch.equal(module.net.conv1.weight, before)


@pytest.mark.parametrize("case", ["not_in_the_optimizer", "distributed"])
def test_a_layer_the_module_froze_is_not_unfrozen_where_it_could_not_train(case):
    from steering_util import batch, build
    from revacnn.steering import SteeringEngine

    module = build("revacnn")
    for param in module.net.conv1.parameters():
        param.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    if case == "distributed":
        optimizer.add_param_group({"params": list(module.net.conv1.parameters())})
    x, y = batch()
    step(module, optimizer, x, y)
    engine = SteeringEngine(module, [optimizer], example_input=x, distributed=case == "distributed")
    ack = engine.apply(cmd("unfreeze", layers=["net.conv2", "net.conv1"]))
    assert not ack["ok"]
    assert ("are in no optimizer" if case == "not_in_the_optimizer" else "cannot be unfrozen during this run") \
        in ack["error"]
    assert ack["error"].startswith("unfreeze: net.conv1 was frozen by the module")
    assert not any(p.requires_grad for p in module.net.conv1.parameters())


@pytest.mark.parametrize("distributed", [False, True])
@pytest.mark.parametrize("keyword", [False, True])
def test_freezes_hold_when_the_optimizer_steps_with_a_closure(distributed, keyword):
    """Lightning steps ``optimizer.step(closure)``: backward runs inside ``step``, after the step pre-hook. A frozen
    layer under DDP (requires_grad left on) got its gradient back from the closure and moved; frozen filters whose
    parameter had no gradient yet at the pre-hook (the first step after a freeze) moved too."""
    import torch.nn.functional as F

    module, optimizer, x, y, engine = setup("revacnn", "adamw", distributed=distributed)
    optimizer.zero_grad(set_to_none=True)
    assert engine.apply(cmd("freeze", layers=["net.conv1"]))["ok"]
    assert engine.apply(cmd("freeze", layer="net.conv3", filters=[1, 4]))["ok"]
    conv1, conv3 = module.net.conv1.weight.detach().clone(), module.net.conv3.weight.detach().clone()
    conv2 = module.net.conv2.weight.detach().clone()
    state = optimizer.state[module.net.conv3.weight]["exp_avg"][[1, 4]].clone()

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure=closure) if keyword else optimizer.step(closure)
    assert torch.equal(module.net.conv1.weight, conv1)
    assert torch.equal(module.net.conv3.weight[[1, 4]], conv3[[1, 4]])
    assert torch.equal(optimizer.state[module.net.conv3.weight]["exp_avg"][[1, 4]], state)
    assert not torch.equal(module.net.conv3.weight, conv3) and not torch.equal(module.net.conv2.weight, conv2)
