"""Structural operations: widen, remove_filters, insert_layer, remove_layer — exactness, optimizer surgery,
training afterwards."""

from __future__ import annotations

import pytest
import torch
from steering_util import (MODELS, MOMENT, OPTIMIZERS, assert_optimizer_consistent, batch, cmd, eval_out, setup,
                           step)

from revacnn.steering.removal import CentreTap

# target layer -> (expected group of producers, expected readers, BNs) written out by hand from the model code
WIDEN_CASES = {
    "revacnn": {
        "net.conv1": ({"net.conv1"}, {"net.conv2"}, set()),
        "net.conv2": ({"net.conv2"}, {"net.conv3"}, set()),
        "net.conv3": ({"net.conv3"}, {"net.fc"}, set()),  # Linear after flatten, HW = 16
    },
    "resnet": {
        "net.conv1": ({"net.conv1", "net.layer1.0.conv2", "net.layer1.1.conv2"},
                      {"net.layer1.0.conv1", "net.layer1.1.conv1", "net.layer2.0.conv1", "net.layer2.0.shortcut.0"},
                      {"net.bn1", "net.layer1.0.bn2", "net.layer1.1.bn2"}),
        "net.layer1.0.conv1": ({"net.layer1.0.conv1"}, {"net.layer1.0.conv2"}, {"net.layer1.0.bn1"}),
        "net.layer2.0.shortcut.0": ({"net.layer2.0.shortcut.0", "net.layer2.0.conv2", "net.layer2.1.conv2"},
                                    {"net.layer2.1.conv1", "net.fc"},
                                    {"net.layer2.0.shortcut.1", "net.layer2.0.bn2", "net.layer2.1.bn2"}),
    },
}
CASES = [(m, o, layer) for m in MODELS for o in OPTIMIZERS for layer in WIDEN_CASES[m]]


def _width(module, name):
    mod = module.get_submodule(name)
    return mod.weight.shape[0]


@pytest.mark.parametrize("kind,opt,layer", CASES)
@pytest.mark.parametrize("split", ["uneven", "even"])
def test_widen_net2net_is_exact_and_keeps_optimizer_state(kind, opt, layer, split):
    module, optimizer, x, y, engine = setup(kind, opt)
    producers, readers, bns = WIDEN_CASES[kind][layer]
    old_width = _width(module, layer)
    before = eval_out(module, x)
    old_params = {n: p.detach().clone() for n, p in module.named_parameters()}
    old_state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in module.named_parameters()}
    running = {n + ".running_mean": module.get_submodule(n).running_mean.clone() for n in bns}

    ack = engine.apply(cmd("widen", layer=layer, count=3, split=split, seed=7))
    assert ack["ok"], ack["error"]
    assert ack["structural"] is True
    after = eval_out(module, x)
    delta = (after - before).abs().max().item()
    assert delta <= 1e-5
    assert ack["changes"]["output_max_abs_change"] == pytest.approx(delta, abs=1e-7)
    assert set(ack["changes"]["group"]) == producers
    assert set(ack["changes"]["readers"]) == readers
    assert set(ack["changes"]["batchnorms"]) == bns
    assert set(ack["filter_maps"]) == producers | bns
    for n in producers | bns:
        assert ack["filter_maps"][n] == {"kept": list(range(old_width)), "added": 3,
                                         "added_at": list(range(old_width, old_width + 3))}
    sources = ack["changes"]["sources"]
    assert len(sources) == 3 and all(0 <= s < old_width for s in sources)

    for n in producers:
        w = module.get_submodule(n).weight
        assert w.shape[0] == old_width + 3
        assert torch.equal(w[:old_width], old_params[n + ".weight"])  # old filters untouched
        for j, s in enumerate(sources):  # copies are exact
            assert torch.equal(w[old_width + j], old_params[n + ".weight"][s])
        st = optimizer.state[w]
        for key, value in old_state[n + ".weight"].items():
            if value.dim() > 0:
                assert torch.equal(st[key][:old_width], value), key  # old state slices unchanged
        if split == "even" and len(set(sources)) == 3:  # one copy per source, even split: state copied as is
            key = MOMENT[opt]
            for j, s in enumerate(sources):
                assert torch.equal(st[key][old_width + j], old_state[n + ".weight"][key][s])
    for n in bns:
        bn = module.get_submodule(n)
        assert bn.num_features == old_width + 3
        for j, s in enumerate(sources):
            assert torch.equal(bn.running_mean[old_width + j], running[n + ".running_mean"][s])
            assert torch.equal(bn.weight[old_width + j], old_params[n + ".weight"][s])
    for n in readers:
        w = module.get_submodule(n).weight
        st = optimizer.state[w]
        for key, value in old_state[n + ".weight"].items():
            if value.dim() > 0:
                hw = value.shape[1] // old_width if w.dim() == 2 else 1
                assert torch.equal(st[key][:, : old_width * hw], value), key
    assert_optimizer_consistent(module, optimizer)

    losses = [step(module, optimizer, x, y) for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", MODELS)
def test_widen_bn_exact_in_train_mode_too(kind):
    module, optimizer, x, y, engine = setup(kind, "sgd")
    layer = "net.layer1.0.conv1" if kind == "resnet" else "net.conv2"
    module.train()
    with torch.no_grad():
        torch.manual_seed(3)
        before = module(x)
    assert engine.apply(cmd("widen", layer=layer, count=2))["ok"]
    with torch.no_grad():
        after = module(x)
    assert (after - before).abs().max().item() <= 1e-5


def test_uneven_split_breaks_symmetry_and_even_split_does_not():
    results = {}
    for split in ("uneven", "even"):
        module, optimizer, x, y, engine = setup("revacnn", "sgd")
        ack = engine.apply(cmd("widen", layer="net.conv2", count=1, split=split, seed=1))
        src = ack["changes"]["sources"][0]
        for _ in range(5):
            step(module, optimizer, x, y)
        w = module.net.conv2.weight
        results[split] = (w[20] - w[src]).abs().max().item()
    assert results["uneven"] > 1e-4
    assert results["even"] < 1e-6


def test_widen_adam_new_filters_do_not_blow_up():
    module, optimizer, x, y, engine = setup("revacnn", "adamw", warm_steps=20)
    ack = engine.apply(cmd("widen", layer="net.conv2", count=4, seed=3))
    assert ack["ok"]
    w = module.net.conv2.weight
    before = w.detach().clone()
    step(module, optimizer, x, y)
    upd = (w.detach() - before).abs()
    lr = optimizer.param_groups[0]["lr"]
    # new rows move by at most about one lr per element, like the old ones (zero moments would give ≈ 3 lr)
    assert upd[20:].max().item() <= 1.5 * lr
    assert upd[20:].max().item() <= 2 * upd[:20].max().item()


@pytest.mark.parametrize("kind", MODELS)
def test_widen_random_init_reports_change(kind):
    module, optimizer, x, y, engine = setup(kind, "sgd")
    layer = "net.conv3" if kind == "revacnn" else "net.layer1.0.conv1"
    before = eval_out(module, x)
    old = module.get_submodule(layer).weight.detach().clone()
    ack = engine.apply(cmd("widen", layer=layer, count=2, init="random"))
    assert ack["ok"] and ack["changes"]["function_preserving"] is False
    w = module.get_submodule(layer).weight
    assert torch.equal(w[: old.shape[0]], old)
    assert w[old.shape[0]:].abs().max().item() <= 0.2
    delta = (eval_out(module, x) - before).abs().max().item()
    assert delta > 1e-6
    assert ack["changes"]["output_max_abs_change"] == pytest.approx(delta, rel=1e-5)
    assert_optimizer_consistent(module, optimizer)
    losses = [step(module, optimizer, x, y) for _ in range(12)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind,opt", [(m, o) for m in MODELS for o in OPTIMIZERS])
def test_remove_filters(kind, opt):
    module, optimizer, x, y, engine = setup(kind, opt)
    layer, reader, bn = {"revacnn": ("net.conv3", "net.fc", None),
                         "resnet": ("net.layer1.0.conv1", "net.layer1.0.conv2", "net.layer1.0.bn1")}[kind]
    conv, rd = module.get_submodule(layer), module.get_submodule(reader)
    width = conv.out_channels
    drop = [0, 5, width - 1]
    kept = [i for i in range(width) if i not in drop]
    old_w, old_r = conv.weight.detach().clone(), rd.weight.detach().clone()
    old_state = {k: v.clone() for k, v in optimizer.state[conv.weight].items()}
    old_rstate = {k: v.clone() for k, v in optimizer.state[rd.weight].items()}
    before = eval_out(module, x)
    ack = engine.apply(cmd("remove_filters", layer=layer, filters=drop))
    assert ack["ok"], ack["error"]
    assert ack["filter_maps"][layer] == {"kept": kept, "added": 0, "added_at": []}
    conv, rd = module.get_submodule(layer), module.get_submodule(reader)
    assert conv.out_channels == width - 3
    assert torch.equal(conv.weight, old_w[kept])
    hw = old_r.shape[1] // width
    cols = [c * hw + k for c in kept for k in range(hw)]
    assert torch.equal(rd.weight, old_r[:, cols])
    for key, v in old_state.items():
        if v.dim() > 0:
            assert torch.equal(optimizer.state[conv.weight][key], v[kept])
    for key, v in old_rstate.items():
        if v.dim() > 0:
            assert torch.equal(optimizer.state[rd.weight][key], v[:, cols])
    if bn:
        assert module.get_submodule(bn).num_features == width - 3
    delta = (eval_out(module, x) - before).abs().max().item()
    assert ack["changes"]["output_max_abs_change"] == pytest.approx(delta, rel=1e-5, abs=1e-8)
    assert_optimizer_consistent(module, optimizer)
    losses = [step(module, optimizer, x, y) for _ in range(12)]
    assert losses[-1] < losses[0]


def test_remove_filters_residual_group_shrinks_every_member():
    module, optimizer, x, y, engine = setup("resnet", "sgd")
    ack = engine.apply(cmd("remove_filters", layer="net.layer1.1.conv2", filters=[3, 1]))
    assert ack["ok"], ack["error"]
    for n in ("net.conv1", "net.layer1.0.conv2", "net.layer1.1.conv2"):
        assert module.get_submodule(n).out_channels == 14
    for n in ("net.bn1", "net.layer1.0.bn2", "net.layer1.1.bn2"):
        assert module.get_submodule(n).num_features == 14
    for n in ("net.layer1.0.conv1", "net.layer1.1.conv1", "net.layer2.0.conv1", "net.layer2.0.shortcut.0"):
        assert module.get_submodule(n).in_channels == 14
    assert_optimizer_consistent(module, optimizer)
    losses = [step(module, optimizer, x, y) for _ in range(10)]
    assert losses[-1] < losses[0]


INSERT_CASES = [("revacnn", "net.conv2", "net.conv2"), ("resnet", "net.layer1.0.conv1", "net.layer1.0.bn1"),
                ("resnet", "net.layer1.0.conv2", "net.layer1.0.bn2")]


@pytest.mark.parametrize("kind,after,anchor", INSERT_CASES)
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_insert_layer_is_exact_and_joins_optimizer_in_module_order(kind, after, anchor, batchnorm, opt):
    module, optimizer, x, y, engine = setup(kind, opt)
    before = eval_out(module, x)
    n_params = len(list(module.parameters()))
    ack = engine.apply(cmd("insert_layer", after=after, batchnorm=batchnorm))
    assert ack["ok"], ack["error"]
    assert ack["changes"]["anchor"] == anchor
    delta = (eval_out(module, x) - before).abs().max().item()
    assert delta <= 1e-5
    new_conv = module.get_submodule(ack["changes"]["inserted"][0])
    assert isinstance(new_conv, torch.nn.Conv2d)
    assert len(list(module.parameters())) == n_params + (new_conv.bias is not None) + 1 + 2 * batchnorm
    assert new_conv.weight not in optimizer.state  # fresh state
    assert_optimizer_consistent(module, optimizer)  # includes: optimizer order == module.parameters() order
    losses = [step(module, optimizer, x, y) for _ in range(12)]
    assert losses[-1] < losses[0]
    assert new_conv.weight in optimizer.state  # it trains


def test_insert_then_remove_layer_restores_function():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    before = eval_out(module, x)
    ack = engine.apply(cmd("insert_layer", after="net.conv1"))
    inserted = ack["changes"]["inserted"][0]
    assert inserted == "net.conv1.inserted.conv"
    with torch.no_grad():  # make the inserted layer non-trivial, so removing it must be visible
        module.get_submodule(inserted).weight.mul_(0.5)
    mid = eval_out(module, x)
    ack = engine.apply(cmd("remove_layer", layer=inserted))
    assert ack["ok"], ack["error"]
    after = eval_out(module, x)
    assert torch.allclose(after, before, atol=1e-6)
    assert ack["changes"]["output_max_abs_change"] == pytest.approx((after - mid).abs().max().item(), rel=1e-5)
    assert_optimizer_consistent(module, optimizer)
    assert [e["op"] for e in engine.changelog] == ["insert_layer", "remove_layer"]


def test_remove_layer_on_resnet_block_conv():
    module, optimizer, x, y, engine = setup("resnet", "adamw")
    before = eval_out(module, x)
    ack = engine.apply(cmd("remove_layer", layer="net.layer1.1.conv1"))
    assert ack["ok"], ack["error"]
    assert isinstance(module.net.layer1[1].conv1, CentreTap) and module.net.layer1[1].conv1.stride == (1, 1)
    delta = (eval_out(module, x) - before).abs().max().item()
    assert ack["changes"]["output_max_abs_change"] == pytest.approx(delta, rel=1e-5)
    assert_optimizer_consistent(module, optimizer)
    losses = [step(module, optimizer, x, y) for _ in range(10)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_reinit_neighbours_is_inverse_distance_average(opt):
    module, optimizer, x, y, engine = setup("revacnn", opt)
    w = module.net.conv2.weight
    old = w.detach().clone()
    old_b = module.net.conv2.bias.detach().clone()
    key = MOMENT[opt]
    old_state = optimizer.state[w][key].clone()
    ack = engine.apply(cmd("reinit_filters", layer="net.conv2", filters=[4], mode="neighbours",
                           neighbours=[1, 2, 3], distances=[1.0, 2.0, 4.0]))
    assert ack["ok"], ack["error"]
    expected = (old[1] * 1.0 + old[2] * 0.5 + old[3] * 0.25) / 1.75
    assert torch.allclose(w[4], expected, atol=1e-6)
    assert torch.allclose(module.net.conv2.bias[4], (old_b[1] + old_b[2] * 0.5 + old_b[3] * 0.25) / 1.75, atol=1e-6)
    others = [i for i in range(20) if i != 4]
    assert torch.equal(w[others], old[others])
    assert torch.equal(optimizer.state[w][key][4], torch.zeros_like(old_state[4]))
    assert torch.equal(optimizer.state[w][key][others], old_state[others])
    assert ack["changes"]["output_max_abs_change"] > 0
    assert engine.changelog == []  # not structural


def test_reinit_values_and_random():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    conv = module.net.conv1
    vals = torch.arange(3 * 25, dtype=torch.float32).reshape(3, 5, 5) / 100
    ack = engine.apply(cmd("reinit_filters", layer="net.conv1", filters=[0], mode="values", values=[vals.tolist()]))
    assert ack["ok"], ack["error"]
    assert torch.equal(conv.weight[0], vals)
    old = conv.weight.detach().clone()
    ack = engine.apply(cmd("reinit_filters", layer="net.conv1", filters=[2, 3], mode="random", seed=5))
    assert ack["ok"], ack["error"]
    bound = 1 / (3 * 25) ** 0.5
    assert not torch.equal(conv.weight[2], old[2]) and conv.weight[2:4].abs().max().item() <= bound
    assert torch.equal(conv.weight[[0, 1, 4]], old[[0, 1, 4]])


def test_same_command_on_two_replicas_gives_bitwise_identical_state():
    """Every DDP rank applies the same command; surgery must be deterministic (no global RNG)."""
    states = []
    for _ in range(2):
        module, optimizer, x, y, engine = setup("resnet", "adamw")
        torch.manual_seed(len(states) * 1000)  # different global RNG on each "rank"
        for c in (cmd("widen", layer="net.conv1", count=3), cmd("widen", layer="net.layer2.0.conv1", count=2,
                                                                   init="random"),
                  cmd("insert_layer", after="net.layer1.0.conv1", batchnorm=True)):
            assert engine.apply(c)["ok"]
        step(module, optimizer, x, y)
        states.append((module.state_dict(), optimizer.state_dict()))
    (m0, o0), (m1, o1) = states
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    for i in o0["state"]:
        for k, v in o0["state"][i].items():
            assert torch.equal(v, o1["state"][i][k])


def test_rmsprop_and_adam_surgery():
    for opt in ("rmsprop", "adam"):
        module, optimizer, x, y, engine = setup("resnet", opt)
        before = eval_out(module, x)
        assert engine.apply(cmd("widen", layer="net.layer2.0.conv2", count=2))["ok"]
        assert (eval_out(module, x) - before).abs().max().item() <= 1e-5
        assert engine.apply(cmd("remove_filters", layer="net.layer1.0.conv1", filters=[2]))["ok"]
        assert_optimizer_consistent(module, optimizer)
        losses = [step(module, optimizer, x, y) for _ in range(8)]
        assert losses[-1] < losses[0]


def test_new_batch_still_trains_after_many_ops():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    for c in (cmd("widen", layer="net.conv1", count=2), cmd("remove_filters", layer="net.conv2", filters=[0, 1]),
              cmd("insert_layer", after="net.conv3", batchnorm=True), cmd("widen", layer="net.conv3", count=1),
              cmd("freeze", layer="net.conv1", filters=[0])):
        ack = engine.apply(c)
        assert ack["ok"], ack["error"]
    x2, y2 = batch(seed=9)
    losses = [step(module, optimizer, x2, y2) for _ in range(12)]
    assert losses[-1] < losses[0]
    assert_optimizer_consistent(module, optimizer)


def test_a_channels_last_model_stays_channels_last():
    """Surgery built every new weight NCHW-contiguous (``select`` ended in ``.contiguous()``, an inserted conv was
    made NCHW), so a channels-last model got a layout conversion per forward at every layer it touched."""
    from revacnn.steering import SteeringEngine
    from steering_util import build, make_optimizer

    channels_last = torch.channels_last
    module = build("resnet").to(memory_format=channels_last)
    optimizer = make_optimizer(module, "sgd")
    x, y = batch()
    x = x.contiguous(memory_format=channels_last)
    for _ in range(3):
        step(module, optimizer, x, y)
    engine = SteeringEngine(module, [optimizer], example_input=x)
    for c in (cmd("widen", layer="net.layer1.0.conv1", count=2),
              cmd("remove_filters", layer="net.layer2.0.conv1", filters=[0, 3]),
              cmd("insert_layer", after="net.layer1.1.conv1", batchnorm=True)):
        ack = engine.apply(c)
        assert ack["ok"], ack["error"]
    step(module, optimizer, x, y)
    touched = ["net.layer1.0.conv1", "net.layer1.0.conv2", "net.layer2.0.conv1", "net.layer2.0.conv2",
               "net.layer1.1.bn1.inserted.conv"]          # widened, its reader, shrunk, its reader, the inserted conv
    for name in touched:
        weight = module.get_submodule(name).weight
        assert weight.is_contiguous(memory_format=channels_last) and not weight.is_contiguous(), name
        buffer = optimizer.state[weight]["momentum_buffer"]
        assert buffer.is_contiguous(memory_format=channels_last) and not buffer.is_contiguous(), name
    assert_optimizer_consistent(module, optimizer)
