"""Filter operations (widen, remove_filters, reinit_filters, freeze of single filters) on every layer role of the
zoo's modern CNNs and the project's own models, through the SteeringEngine directly.

Each case either works — eval output unchanged within 1e-5 where the op promises it (measured here, before vs
after, not read from the ack), optimizer state shaped like the parameters, a step and 5 more finite — or is
refused with the expected reason and the model and optimizer state bitwise unchanged. The expected table holds
only the refusals that remain (see docs/steering.md, "Coverage on the zoo"). The function is compared on float64 copies
(``_change64``).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import zoo
from torch import nn
from steering_util import assert_optimizer_consistent, assert_same_state, cmd, eval_out, snapshot, step

from revacnn.demo.models import ReVACNNNet, SmallResNet
from revacnn.steering import SteeringEngine, replay_changelog

MB, EN = "model.mobilenet_v2.", "model.efficientnet.encoder.blocks.1."
RG, CN, RB = "model.regnet.encoder.stages.", "model.convnext.", "model.resnet."
# model -> role -> layer
ROLES = {
    "mobilenet_v2_small": {"stem": MB + "conv_stem.first_conv.convolution",
                           "expand": MB + "layer.1.expand_1x1.convolution",
                     "depthwise": MB + "layer.1.conv_3x3.convolution", "project": MB + "layer.1.reduce_1x1.convolution",
                     "head": "model.classifier"},
    "efficientnet": {"stem": "model.efficientnet.embeddings.convolution", "expand": EN + "expansion.expand_conv",
                     "depthwise": EN + "depthwise_conv.depthwise_conv", "se_reduce": EN + "squeeze_excite.reduce",
                     "se_expand": EN + "squeeze_excite.expand", "project": EN + "projection.project_conv",
                     "head": "model.classifier"},
    "regnet_x": {"stem": "model.regnet.embedder.embedder.convolution", "expand": RG + "1.layers.1.layer.0.convolution",
                 "grouped": RG + "1.layers.1.layer.1.convolution", "residual": RG + "1.layers.1.layer.2.convolution",
                 "head": "model.classifier.1"},
    "regnet_y": {"expand": RG + "0.layers.0.layer.0.convolution", "grouped": RG + "0.layers.0.layer.1.convolution",
                 "se_reduce": RG + "0.layers.0.layer.2.attention.0", "se_expand": RG + "0.layers.0.layer.2.attention.2",
                 "residual": RG + "0.layers.0.layer.3.convolution"},
    "convnext": {"stem": CN + "embeddings.patch_embeddings", "depthwise": CN + "encoder.stages.0.layers.0.dwconv",
                 "mlp_hidden": CN + "encoder.stages.1.layers.0.pwconv1",
                 "residual": CN + "encoder.stages.0.layers.0.pwconv2", "head": "model.classifier"},
    "resnet_bottleneck": {"stem": RB + "embedder.embedder.convolution",
                          "expand": RB + "encoder.stages.1.layers.0.layer.0.convolution",
                          "residual": RB + "encoder.stages.1.layers.0.shortcut.convolution"},
    "grouped": {"stem": "stem", "grouped": "grouped", "project": "pointwise", "head": "fc"},
    "grouped_stack": {"stem": "stem", "multiplier": "multiplier", "grouped": "grouped", "project": "pointwise",
                      "head": "fc"},
    "mobile_block": {"stem": "stem", "expand": "block1.expand", "depthwise": "block1.depthwise",
                     "se_reduce": "block1.se.reduce", "se_expand": "block1.se.expand", "project": "block2.project"},
    "revacnn": {"stem": "conv1", "flatten": "conv3", "head": "fc"},
    "smallresnet": {"residual": "conv1", "middle": "layer1.0.conv1", "head": "fc"},
}
OWN = {"mobilenet_v2_small": zoo.mobilenet_v2_small, "revacnn": ReVACNNNet, "smallresnet": SmallResNet}
OPS = ("widen", "remove_filters", "reinit_filters", "freeze_filters")
GROUP_SIZE = {"regnet_x": 8, "regnet_y": 8}  # RegNet's group width: its channels move 8 at a time
GROUPED_BY = ("expand", "grouped", "se_expand")  # the roles whose channels a RegNet group conv reads
OUTPUT = "channels reach the model output directly"  # the class count is the task's, not the model's
# grouped convs with in ≠ out channels split the channels they write or read into this many slices: new and
# removed filters come the same number from every slice
SLICES = {("grouped", "stem"): 4, ("grouped", "grouped"): 4, ("grouped_stack", "stem"): 16,
          ("grouped_stack", "multiplier"): 16, ("grouped_stack", "grouped"): 4}
LAYER_NORM = "normalises over the channels"
GROUP_NORM = "GroupNorm norm normalises over groups of channels"
ONE_PER_GROUP = "split these channels into 16 groups of 1 (one filter each); remove the same number"
# (model, role, op) -> the words of the refusal that remains; every other case works.
REFUSED = {
    **{(m, "head", op): OUTPUT for m in ROLES for op in ("widen", "remove_filters") if "head" in ROLES[m]},
    **{("convnext", role, "widen"): LAYER_NORM for role in ("stem", "depthwise", "residual")},
    ("grouped", "grouped", "widen"): GROUP_NORM,  # GroupNorm(4, 32) after the grouped conv: copies change it
    ("grouped_stack", "stem", "remove_filters"): ONE_PER_GROUP,  # each group of the depthwise reader reads one
}


@functools.cache
def _warmed(model: str):
    """The model and its AdamW after one step (so state exists)."""
    torch.manual_seed(0)
    net = zoo.calibrate(OWN.get(model, zoo.ZOO.get(model))())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step(net, optimizer, *_batch())
    return net, optimizer


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, *zoo.IMAGE, generator=g), torch.randint(0, zoo.CLASSES, (2,), generator=g)


def _setup(model: str):
    """A fresh copy of the warmed model and its optimizer (state included), a batch, and an engine."""
    net, optimizer = copy.deepcopy(_warmed(model))
    x, y = _batch()
    return net, optimizer, x, y, SteeringEngine(net, [optimizer], example_input=x)


def _change64(net, x, command: dict) -> float:
    """The eval output change the command makes on a float64 copy of ``net``. Net2Net is exact up to rounding,
    and the calibrated MobileNetV2 amplifies float32 rounding of the split weights to ~1e-3 on logits of ~6
    (3e-12 in float64): the 1e-5 bound then tests the mathematics, not the conditioning of the model."""
    twin, x = copy.deepcopy(net).double(), x[:1].double()  # one image: float64 convs are slow on CPU
    before = eval_out(twin, x)
    ack = SteeringEngine(twin, [], example_input=x).apply(command)
    assert ack["ok"], ack["error"]
    return (eval_out(twin, x) - before).abs().max().item()


def _command(model: str, role: str, op: str, layer: str, width: int) -> dict:
    block = GROUP_SIZE.get(model, 1) if role in GROUPED_BY else 1
    slices = SLICES.get((model, role), 1)
    if op == "widen":
        return cmd("widen", layer=layer, count=2 * block * slices, seed=3)
    if op == "remove_filters" and slices > 1:  # the second filter of every slice; one filter where a slice has one
        size = width // slices
        return cmd("remove_filters", layer=layer, filters=[g * size + 1 for g in range(slices)] if size > 1 else [1])
    if op == "remove_filters":
        return cmd("remove_filters", layer=layer, filters=list(range(block, 2 * block)))
    if op == "reinit_filters":
        return cmd("reinit_filters", layer=layer, filters=[0, width - 1], mode="random", seed=2)
    return cmd("freeze", layer=layer, filters=[0])


def _train_finite(net, optimizer, x, y) -> None:
    assert_optimizer_consistent(net, optimizer)
    losses = [step(net, optimizer, x, y) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses))), losses


# reinit_filters and single-filter freeze change rows of one layer; they depend on the coupling only where the
# layer is grouped (its rows are its groups' kernels)
GROUPED_ROLES = ("depthwise", "grouped", "multiplier")
CASES = [(m, role, op) for m, roles in ROLES.items() for role in roles for op in OPS
         if op in ("widen", "remove_filters") or role in GROUPED_ROLES]


@pytest.mark.parametrize(("model", "role", "op"), CASES, ids=["-".join(c) for c in CASES])
def test_filter_op_on_a_layer_role(model, role, op):
    net, optimizer, x, y, engine = _setup(model)
    layer = ROLES[model][role]
    command = _command(model, role, op, layer, net.get_submodule(layer).weight.shape[0])
    promised = op == "widen"  # Net2Net promises the function (and freezing, which changes no weight)
    change64 = _change64(net, x, command) if promised and (model, role, op) not in REFUSED else None
    state, before = snapshot(net, optimizer), eval_out(net, x)
    ack = engine.apply(command)
    expected = REFUSED.get((model, role, op))
    if expected is not None:
        assert not ack["ok"] and expected in ack["error"], ack
        assert_same_state(state, snapshot(net, optimizer))
        return
    assert ack["ok"], ack["error"]
    if promised:
        assert ack["changes"]["function_preserving"] and change64 <= 1e-5
    if op == "freeze_filters":
        assert torch.equal(eval_out(net, x), before)
    if op == "widen":
        assert net.get_submodule(layer).weight.shape[0] == ack["changes"]["channels"][1]
    _train_finite(net, optimizer, x, y)


@pytest.mark.parametrize("model", ["regnet_x", "regnet_y"])
def test_grouped_conv_channels_move_by_whole_groups(model):
    """A count or a removal that splits a conv group is refused naming the group size; nothing changes."""
    net, optimizer, x, y, engine = _setup(model)
    state = snapshot(net, optimizer)
    layer = ROLES[model]["grouped"]
    ack = engine.apply(cmd("widen", layer=layer, count=3))
    assert not ack["ok"] and "in groups of 8" in ack["error"] and "multiple of 8" in ack["error"], ack
    ack = engine.apply(cmd("remove_filters", layer=layer, filters=[1]))
    assert not ack["ok"] and "remove whole groups (filters 0…7 for group 0)" in ack["error"], ack
    assert_same_state(state, snapshot(net, optimizer))


def test_depthwise_copies_keep_their_kernels_and_the_division_is_at_the_dense_reader():
    net, optimizer, x, y, engine = _setup("mobile_block")
    old_dw = net.block1.depthwise.weight.detach().clone()
    old_project = net.block1.project.weight.detach().clone()
    ack = engine.apply(cmd("widen", layer="block1.expand", count=3, seed=5, split="even"))
    assert ack["ok"], ack["error"]
    sources = ack["changes"]["sources"]
    dw, project = net.block1.depthwise, net.block1.project
    assert dw.groups == dw.in_channels == dw.out_channels == 67
    for j, s in enumerate(sources):
        assert torch.equal(dw.weight[64 + j], old_dw[s])  # the copied channel's kernel, bitwise
        copies = 1 + sources.count(s)
        torch.testing.assert_close(project.weight[:, 64 + j], old_project[:, s] / copies)
    # the SE gate: its expand conv copies the gate rows, its reduce conv reads 67 channels
    assert net.block1.se.expand.out_channels == 67 and net.block1.se.reduce.in_channels == 67
    # Adam's moments of a copy are its source's (divided like the weight where the reader divides)
    assert torch.equal(optimizer.state[dw.weight]["exp_avg"][64], optimizer.state[dw.weight]["exp_avg"][sources[0]])


def test_layernorm_widening_is_applied_on_request_with_the_measured_change():
    net, optimizer, x, y, engine = _setup("convnext")
    before = eval_out(net, x)
    ack = engine.apply(cmd("widen", layer=ROLES["convnext"]["residual"], count=2, allow_inexact=True))
    assert ack["ok"], ack["error"]
    changes = ack["changes"]
    assert changes["function_preserving"] is False and any(LAYER_NORM in r for r in changes["inexact"])
    measured = (eval_out(net, x) - before).abs().max().item()
    assert changes["output_max_abs_change"] == pytest.approx(measured, rel=1e-5, abs=1e-7)
    assert len(changes["scales"]) == 1 and len(changes["norms"]) == 3  # layer-scale and LayerNorms widened too
    _train_finite(net, optimizer, x, y)


def test_convnext_mlp_hidden_width_widens_exactly_through_token_linears():
    net, optimizer, x, y, engine = _setup("convnext")
    layer = ROLES["convnext"]["mlp_hidden"]
    assert _change64(net, x, cmd("widen", layer=layer, count=5)) <= 1e-5
    ack = engine.apply(cmd("widen", layer=layer, count=5))
    assert ack["ok"] and ack["changes"]["function_preserving"], ack
    assert net.get_submodule(layer).out_features == 133
    assert net.get_submodule(layer.replace("pwconv1", "pwconv2")).in_features == 133


class ConcatNet(nn.Module):
    """Two convs concatenated into a third: a reader whose input holds two groups, one after the other."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.c = nn.Conv2d(9, 4, 3, padding=1)
        self.fc = nn.Linear(4, zoo.CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))).mean((2, 3)))


@pytest.mark.parametrize("layer", ["a", "b"])
def test_a_block_of_a_concatenation_widens_exactly_and_is_pruned_in_place(layer):
    torch.manual_seed(0)
    net = ConcatNet().double()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = _batch()
    x = x.double()
    step(net, optimizer, x, y)
    engine = SteeringEngine(net, [optimizer], example_input=x)
    old_c, before = net.c.weight.detach().clone(), eval_out(net, x)
    ack = engine.apply(cmd("widen", layer=layer, count=2, split="even", seed=1))
    assert ack["ok"] and ack["changes"]["readers"] == ["c"], ack
    assert (eval_out(net, x) - before).abs().max().item() <= 1e-12
    offset, width = (0, 4) if layer == "a" else (4, 5)
    kept = [c for c in range(9) if not offset <= c < offset + width]  # the other block's columns, unscaled
    new_kept = [c if c < offset else c + 2 for c in kept]
    assert torch.equal(net.c.weight[:, new_kept], old_c[:, kept])
    ack = engine.apply(cmd("remove_filters", layer=layer, filters=[0]))
    assert ack["ok"] and net.c.in_channels == 10, ack
    _train_finite(net, optimizer, x, y)


class GroupNormNet(nn.Module):
    """conv → GroupNorm(2 groups) → conv: pruning keeps a count the groups divide; widening copies is inexact."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, zoo.CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.norm(self.a(x))))).mean((2, 3)))


def test_group_norm_needs_a_channel_count_its_groups_divide():
    torch.manual_seed(0)
    net = GroupNormNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = _batch()
    step(net, optimizer, x, y)
    engine = SteeringEngine(net, [optimizer], example_input=x)
    state = snapshot(net, optimizer)
    ack = engine.apply(cmd("remove_filters", layer="a", filters=[0]))
    assert not ack["ok"] and "GroupNorm norm splits the channels into 2 groups" in ack["error"], ack
    ack = engine.apply(cmd("widen", layer="a", count=2))
    assert not ack["ok"] and "GroupNorm norm normalises over groups of channels" in ack["error"], ack
    assert_same_state(state, snapshot(net, optimizer))
    ack = engine.apply(cmd("remove_filters", layer="a", filters=[0, 5]))
    assert ack["ok"] and net.norm.num_channels == 6 and net.norm.weight.shape == (6,), ack
    ack = engine.apply(cmd("widen", layer="a", count=2, allow_inexact=True))
    assert ack["ok"] and ack["changes"]["function_preserving"] is False and net.norm.num_channels == 8, ack
    _train_finite(net, optimizer, x, y)


@pytest.mark.parametrize(("model", "command"), [
    ("mobile_block", cmd("widen", layer="block1.expand", count=3)),  # depthwise and SE in the group
    ("convnext", cmd("widen", layer=ROLES["convnext"]["residual"], count=2, allow_inexact=True)),  # norms, scale
    ("regnet_y", cmd("remove_filters", layer=ROLES["regnet_y"]["grouped"], filters=list(range(8)))),
    ("grouped", cmd("widen", layer="stem", count=8)),  # new channels inside the groups of a grouped reader
    ("grouped_stack", cmd("remove_filters", layer="multiplier", filters=list(range(0, 32, 2)))),
    ("grouped_stack", cmd("widen", layer="grouped", count=4, init="random")),
])
def test_the_change_log_rebuilds_the_shapes_on_a_fresh_model(model, command):
    """A checkpoint of the steered model loads into a fresh model once the change log is replayed."""
    net, optimizer, x, y, engine = _setup(model)
    assert engine.apply(command)["ok"]
    fresh = zoo.calibrate(zoo.ZOO[model]())
    replay_changelog(fresh, engine.changelog)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(eval_out(fresh, x), eval_out(net, x))
