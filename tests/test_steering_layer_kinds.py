"""Filter-level steering beyond Conv2d: Conv1d and Conv3d filters, and the neurons of a Linear layer with a
``[batch, features]`` output — widen, remove_filters, freeze, reinit_filters, insert_layer and remove_layer, each
checked against values taken from the model's own tensors before the change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from steering_util import assert_optimizer_consistent, cmd, eval_out, make_optimizer
from steering_util import step as train_step
from torch import nn

from revacnn.steering import SteeringEngine


class MLP(nn.Module):
    """Linear → BN1d → ReLU → Linear → ReLU → Dropout → Linear (the logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(20, 16), nn.BatchNorm1d(16)
        self.fc2, self.drop, self.fc3 = nn.Linear(16, 12), nn.Dropout(0.1), nn.Linear(12, 5)

    def forward(self, x):
        return self.fc3(self.drop(F.relu(self.fc2(F.relu(self.bn1(self.fc1(x)))))))


class Signal1d(nn.Module):
    """Conv1d → BN1d → ReLU → MaxPool1d → Conv1d → ReLU → AvgPool1d → flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(3, 8, 5, padding=2), nn.BatchNorm1d(8)
        self.conv2, self.fc = nn.Conv1d(8, 6, 3, padding=1), nn.Linear(6 * 8, 5)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(torch.flatten(F.avg_pool1d(F.relu(self.conv2(x)), 2), 1))


class Volume3d(nn.Module):
    """Conv3d → BN3d → ReLU → MaxPool3d → Conv3d → ReLU → AdaptiveAvgPool3d(2) → flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(2, 6, 3, padding=1), nn.BatchNorm3d(6)
        self.conv2, self.fc = nn.Conv3d(6, 4, 3, padding=1), nn.Linear(4 * 8, 5)

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool3d(F.relu(self.conv2(x)), 2), 1))


class Tokens(nn.Module):
    """A transformer-style MLP on ``[batch, tokens, features]``: its Linear layers have token outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.fc2(F.gelu(self.fc1(x))).mean(1))


NETS = {"mlp": (MLP, (20,)), "conv1d": (Signal1d, (3, 32)), "conv3d": (Volume3d, (2, 8, 8, 8)),
        "tokens": (Tokens, (6, 8))}

# layer -> (producers, readers, BNs), written out by hand from the model code
GROUPS = {
    ("mlp", "fc1"): ({"fc1"}, {"fc2"}, {"bn1"}),
    ("mlp", "fc2"): ({"fc2"}, {"fc3"}, set()),
    ("conv1d", "conv1"): ({"conv1"}, {"conv2"}, {"bn1"}),
    ("conv1d", "conv2"): ({"conv2"}, {"fc"}, set()),     # fc reads 6 channels × 8 positions
    ("conv3d", "conv1"): ({"conv1"}, {"conv2"}, {"bn1"}),
    ("conv3d", "conv2"): ({"conv2"}, {"fc"}, set()),     # fc reads 4 channels × 2×2×2
}


def setup(kind: str, opt: str = "sgd", steps: int = 3):
    torch.manual_seed(0)
    net_type, shape = NETS[kind]
    module = net_type()
    optimizer = make_optimizer(module, opt)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, *shape, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    for _ in range(steps):
        train_step(module, optimizer, x, y)
    return module, optimizer, x, y, SteeringEngine(module, [optimizer], example_input=x)


@pytest.mark.parametrize("kind,layer", list(GROUPS))
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_widen_keeps_the_function_and_the_optimizer_state(kind, layer, opt):
    module, optimizer, x, y, engine = setup(kind, opt)
    producers, readers, bns = GROUPS[(kind, layer)]
    width = module.get_submodule(layer).weight.shape[0]
    before = eval_out(module, x)
    old = {n: p.detach().clone() for n, p in module.named_parameters()}
    old_state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in module.named_parameters()}

    ack = engine.apply(cmd("widen", layer=layer, count=3, seed=5))
    assert ack["ok"], ack["error"]
    assert (set(ack["changes"]["group"]), set(ack["changes"]["readers"]), set(ack["changes"]["batchnorms"])) == \
        (producers, readers, bns)
    assert (eval_out(module, x) - before).abs().max().item() <= 1e-5
    sources = ack["changes"]["sources"]
    for name in producers:
        weight = module.get_submodule(name).weight
        assert weight.shape[0] == width + 3
        assert torch.equal(weight[:width], old[name + ".weight"])
        for j, source in enumerate(sources):
            assert torch.equal(weight[width + j], old[name + ".weight"][source])
        for key, value in old_state[name + ".weight"].items():
            if value.dim() > 0:
                assert torch.equal(optimizer.state[weight][key][:width], value), key
    for name in readers:
        reader = module.get_submodule(name)
        hw = old[name + ".weight"].shape[1] // width
        assert reader.weight.shape[1] == (width + 3) * hw
        assert (reader.in_features if isinstance(reader, nn.Linear) else reader.in_channels) == (width + 3) * hw
    for name in bns:
        assert module.get_submodule(name).num_features == width + 3
    assert_optimizer_consistent(module, optimizer)
    losses = [train_step(module, optimizer, x, y) for _ in range(10)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind,layer", list(GROUPS))
def test_remove_filters_keeps_the_other_rows_and_columns(kind, layer):
    module, optimizer, x, y, engine = setup(kind, "adamw")
    producers, readers, bns = GROUPS[(kind, layer)]
    width = module.get_submodule(layer).weight.shape[0]
    kept = [i for i in range(width) if i not in (1, 3)]
    old = {n: p.detach().clone() for n, p in module.named_parameters()}
    old_moment = {n: optimizer.state[p]["exp_avg"].clone() for n, p in module.named_parameters()}
    old_running = {n: module.get_submodule(n).running_var.clone() for n in bns}

    ack = engine.apply(cmd("remove_filters", layer=layer, filters=[3, 1]))
    assert ack["ok"], ack["error"]
    for name in producers:
        weight = module.get_submodule(name).weight
        assert torch.equal(weight, old[name + ".weight"][kept])
        assert torch.equal(optimizer.state[weight]["exp_avg"], old_moment[name + ".weight"][kept])
    for name in readers:
        weight = module.get_submodule(name).weight
        hw = old[name + ".weight"].shape[1] // width
        columns = [c * hw + k for c in kept for k in range(hw)]
        assert torch.equal(weight, old[name + ".weight"][:, columns])
    for name in bns:
        assert torch.equal(module.get_submodule(name).running_var, old_running[name][kept])
        assert torch.equal(module.get_submodule(name).weight, old[name + ".weight"][kept])
    assert_optimizer_consistent(module, optimizer)
    assert all(torch.isfinite(torch.tensor([train_step(module, optimizer, x, y) for _ in range(3)])))


@pytest.mark.parametrize("kind,layer", [("mlp", "fc1"), ("mlp", "fc3"), ("conv1d", "conv2"), ("conv3d", "conv1")])
def test_frozen_filters_stay_bitwise_while_the_others_train(kind, layer):
    module, optimizer, x, y, engine = setup(kind)
    assert engine.apply(cmd("freeze", layer=layer, filters=[0, 2]))["ok"]
    mod = module.get_submodule(layer)
    weight, bias = mod.weight.detach().clone(), mod.bias.detach().clone()
    for _ in range(4):
        train_step(module, optimizer, x, y)
    assert torch.equal(mod.weight[[0, 2]], weight[[0, 2]]) and torch.equal(mod.bias[[0, 2]], bias[[0, 2]])
    assert not torch.equal(mod.weight[1], weight[1])
    assert engine.apply(cmd("unfreeze", layer=layer, filters=[0, 2]))["ok"]
    train_step(module, optimizer, x, y)
    assert not torch.equal(mod.weight[0], weight[0])


@pytest.mark.parametrize("kind,layer", [("mlp", "fc2"), ("conv1d", "conv1"), ("conv3d", "conv2")])
def test_reinit_neighbours_is_the_inverse_distance_average(kind, layer):
    module, optimizer, x, y, engine = setup(kind)
    mod = module.get_submodule(layer)
    weight, bias = mod.weight.detach().double().clone(), mod.bias.detach().double().clone()
    ack = engine.apply(cmd("reinit_filters", layer=layer, filters=[0], mode="neighbours", neighbours=[1, 2],
                           distances=[1.0, 3.0]))
    assert ack["ok"], ack["error"]
    expected = 0.75 * weight[1] + 0.25 * weight[2]  # weights 1/1 and 1/3, normalised
    assert torch.allclose(mod.weight[0].double(), expected, atol=1e-6)
    assert torch.allclose(mod.bias[0].double(), 0.75 * bias[1] + 0.25 * bias[2], atol=1e-6)
    assert float(optimizer.state[mod.weight]["momentum_buffer"][0].abs().sum()) == 0.0


def test_reinit_values_names_the_shape_of_a_linear_neuron():
    module, optimizer, x, y, engine = setup("mlp")
    ack = engine.apply(cmd("reinit_filters", layer="fc2", filters=[0], mode="values", values=[[0.0] * 15]))
    assert not ack["ok"] and "expected [16] (in_features)" in ack["error"]
    assert engine.apply(cmd("reinit_filters", layer="fc2", filters=[0], mode="values", values=[[0.5] * 16]))["ok"]
    assert torch.equal(module.fc2.weight[0], torch.full((16,), 0.5))


@pytest.mark.parametrize("kind,after,anchor,conv_type,bn_type", [
    ("conv1d", "conv1", "bn1", nn.Conv1d, nn.BatchNorm1d),   # conv → BN → ReLU: inserted after the ReLU
    ("conv3d", "conv2", "conv2", nn.Conv3d, nn.BatchNorm3d),
])
def test_insert_and_remove_a_layer_of_the_same_kind(kind, after, anchor, conv_type, bn_type):
    module, optimizer, x, y, engine = setup(kind)
    before = eval_out(module, x)
    ack = engine.apply(cmd("insert_layer", after=after, batchnorm=True))
    assert ack["ok"], ack["error"]
    assert ack["changes"]["anchor"] == anchor
    inserted = module.get_submodule(anchor).inserted
    assert [type(m) for m in inserted][-2:] == [conv_type, bn_type]
    assert (eval_out(module, x) - before).abs().max().item() <= 1e-5
    assert_optimizer_consistent(module, optimizer)
    losses = [train_step(module, optimizer, x, y) for _ in range(8)]
    assert losses[-1] < losses[0]
    new_conv = ack["changes"]["inserted"][0]
    assert engine.apply(cmd("remove_layer", layer=new_conv))["ok"]
    assert "inserted" not in module.get_submodule(anchor)._modules     # the whole insertion is undone
    assert_optimizer_consistent(module, optimizer)


def test_linear_layers_on_tokens_widen_exactly_and_prune():
    """A token MLP (Linear on [batch, tokens, features]): the features are the channels, as in ConvNeXt's block."""
    module, optimizer, x, y, engine = setup("tokens", "adamw")
    before = eval_out(module, x)
    ack = engine.apply(cmd("widen", layer="fc1", count=3, split="even"))
    assert ack["ok"] and ack["changes"]["readers"] == ["fc2"], ack
    assert module.fc1.out_features == module.fc2.in_features == 19
    assert (eval_out(module, x) - before).abs().max().item() <= 1e-5
    ack = engine.apply(cmd("remove_filters", layer="fc2", filters=[0]))
    assert ack["ok"] and module.fc2.out_features == module.head.in_features == 7, ack
    assert_optimizer_consistent(module, optimizer)
    assert torch.isfinite(torch.tensor([train_step(module, optimizer, x, y) for _ in range(5)])).all()


@pytest.mark.parametrize("kind,command,message", [
    ("mlp", cmd("widen", layer="fc3", count=1), "fc3's channels reach the model output directly"),
    ("tokens", cmd("insert_layer", after="fc1", batchnorm=True), "needs its output to be [batch, features]"),
    ("mlp", cmd("remove_layer", layer="fc2"), "fc2 maps 16 to 12 features"),
    ("conv1d", cmd("freeze", layer="bn1", filters=[0]), "single filters can be (un)frozen only in a conv"),
])
def test_what_cannot_be_done_is_refused_and_changes_nothing(kind, command, message):
    module, optimizer, x, y, engine = setup(kind)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    ack = engine.apply(command)
    assert not ack["ok"] and message in ack["error"], ack["error"]
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
