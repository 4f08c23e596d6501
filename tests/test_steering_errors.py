"""Bad commands: each gets ok=False with a helpful message and leaves model, optimizer and scheduler unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from steering_util import assert_same_state, batch, build, make_optimizer, snapshot, step
from torch import nn

from revacnn.steering import SteeringEngine


class DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.dw(F.relu(self.a(x)))), 1).flatten(1))


class HeadlessNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 10, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.a(x))).mean((2, 3))


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.b(F.relu(self.b(F.relu(self.a(x))))).mean((2, 3)))


class PermuteNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, stride=4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.a(x)).permute(0, 2, 3, 1).reshape(x.shape[0], -1))


class UpsampleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(F.relu(self.up(F.relu(self.a(x)))).mean((2, 3)))


class WidthCheckNet(nn.Module):
    """Its forward insists on 4 channels after ``a``: a coupling that tracing the graph cannot see."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = F.relu(self.a(x))
        if h.shape[1] != 4:
            raise ValueError(f"expected 4 channels, got {h.shape[1]}")
        return self.fc(F.relu(self.b(h)).mean((2, 3)))


def C(op, **args):
    return {"id": "bad", "op": op, "args": args}


R, N = "revacnn", "resnet"
# (model, command, expected words in the error)
BAD = [
    (R, ["not", "a", "dict"], "must be a dict"),
    (R, {"op": "freeze", "args": {"layers": ["net.conv1"]}}, "'id'"),
    (R, {"id": 3, "op": "freeze", "args": {"layers": ["net.conv1"]}}, "'id'"),
    (R, {"id": "x", "op": 7, "args": {}}, "'op' must be a string"),
    (R, C("explode"), "unknown op 'explode'"),
    (R, {"id": "x", "op": "freeze", "args": ["net.conv1"]}, "'args' of freeze must be a dict"),
    (R, C("freeze"), "needs 'layers'"),
    (R, C("freeze", layers=["net.conv9"]), "unknown layer 'net.conv9'"),
    (R, C("freeze", layers="net.conv1"), "non-empty list of layer names"),
    (R, C("freeze", layers=["net.conv1", "net.conv1"]), "duplicate layer names"),
    (R, C("freeze", layers=["net.conv1"], layer="net.conv2", filters=[0]), "either 'layers'"),
    (N, C("freeze", layers=["net.layer1.0.shortcut"]), "has no parameters"),
    (R, C("freeze", layer="net.conv2", filters=[20]), "out of range [0, 20)"),
    (R, C("freeze", layer="net.conv2", filters=[-1]), "out of range"),
    (R, C("freeze", layer="net.conv2", filters=[1, 1]), "duplicate filter"),
    (R, C("freeze", layer="net.conv2", filters=[True]), "integers only"),
    (N, C("freeze", layer="net.bn1", filters=[0]), "BatchNorm2d; single filters can be (un)frozen only in a conv"),
    (R, C("unfreeze", layers=["nope"]), "unknown layer 'nope'"),
    (R, C("set_hparams"), "at least one of lr"),
    (R, C("set_hparams", lr=-0.1), "must be >= 0"),
    (R, C("set_hparams", lr=float("nan")), "must be finite"),
    (R, C("set_hparams", momentum=float("inf")), "must be finite"),
    (R, C("set_hparams", lr="0.1"), "must be a number"),
    (R, C("set_hparams", lr=0.1, groups=[3]), "param group 3 does not exist"),
    (R, C("set_hparams", lrr=0.1), "unknown field(s) lrr"),
    ("adagrad", C("set_hparams", momentum=0.9), "Adagrad has no momentum"),
    ("adamw", C("set_hparams", momentum=1.0), "must be < 1"),
    (R, C("widen", layer="net.conv1"), "missing required field(s) count"),
    (R, C("widen", layer="net.conv1", count=0), "'count' must be >= 1"),
    (R, C("widen", layer="net.conv1", count=1.5), "'count' must be an integer"),
    (R, C("widen", layer="net.conv1", count=1, init="zeros"), "'init' must be one of net2net, random"),
    (R, C("widen", layer="net.conv1", count=1, split="odd"), "'split' must be one of"),
    (R, C("widen", layer="net.fc", count=1), "net.fc's channels reach the model output directly"),
    ("upsample", C("widen", layer="up", count=1), "ConvTranspose2d; widen needs a conv (1-D, 2-D or 3-D) or Linear"),
    (R, C("widen", layer="net.conv7", count=1), "unknown layer 'net.conv7'"),
    (R, C("widen", layer=3, count=1), "must be a non-empty string"),
    ("adagrad", C("widen", layer="net.conv1", count=1), "Adagrad is not supported for structural changes"),
    ("noinput", C("widen", layer="net.conv1", count=1), "no example_input"),
    ("headless", C("widen", layer="b", count=1), "reach the model output directly"),
    ("shared", C("widen", layer="b", count=1), "called 2 times"),
    # Torch-Pruning maps a flatten to columns channels-first; after a permute that would be wrong
    ("permute", C("widen", layer="a", count=1), "fc reads a flatten of permuted (channels-last) maps"),
    # the layer that stops it, and nothing else (the walk went on into its weight: "a parameter used directly")
    ("upsample", C("widen", layer="a", count=1), "coupled layers ['a'] — unsupported layer up (ConvTranspose2d) in "
                                                 "the channel path"),
    (R, C("remove_filters", layer="net.conv2", filters=list(range(20))), "cannot remove all 20 filters"),
    (R, C("remove_filters", layer="net.conv2", filters=[]), "must not be empty"),
    (R, C("remove_filters", layer="net.conv2", filters=[25]), "filter 25 in 'filters' is out of range"),
    (N, C("remove_filters", layer="net.bn1", filters=[0]), "is a BatchNorm2d"),
    (N, C("insert_layer", after="net.bn1"), "is a BatchNorm2d; insert_layer needs a conv (1-D, 2-D or 3-D) or Linear"),
    (R, C("insert_layer", after="net.conv1", batchnorm="yes"), "'batchnorm' must be true or false"),
    ("depthwise", C("remove_layer", layer="a"), "maps 3 to 4 channels"),
    ("depthwise", C("remove_layer", layer="fc"), "fc maps 4 to 10 features"),
    ("shared", C("insert_layer", after="b"), "called 2 times"),
    (R, C("remove_layer", layer="net.conv1"), "maps 3 to 16 channels"),
    (R, C("remove_layer", layer="net.fc"), "net.fc maps 320 to 10 features"),
    (N, C("remove_layer", layer="net.layer2.0.conv1"), "maps 16 to 32 channels"),
    (R, C("reinit_filters", layer="net.conv2", filters=[0], mode="drag"), "'mode' must be one of"),
    (R, C("reinit_filters", layer="net.conv2", filters=[0], mode="neighbours", neighbours=[1]), "needs 'neighbours' and "
                                                                                                 "'distances'"),
    (R, C("reinit_filters", layer="net.conv2", filters=[0], mode="neighbours", neighbours=[1, 2], distances=[1, 0]),
     "must be > 0"),
    (R, C("reinit_filters", layer="net.conv2", filters=[0], mode="neighbours", neighbours=[1, 2], distances=[1]),
     "one per neighbour"),
    (R, C("reinit_filters", layer="net.conv2", filters=[0], mode="neighbours", neighbours=[1, 30], distances=[1, 2]),
     "neighbour filter 30"),
    (R, C("reinit_filters", layer="net.conv2", filters=[0], mode="values", values=[[[0.0] * 5] * 5]),
     "expected [16, 5, 5]"),
    (R, C("reinit_filters", layer="net.conv1", filters=[0], mode="values",
          values=[[[[float("nan")] * 5] * 5] * 3]), "NaN or infinity"),
    (R, C("reinit_filters", layer="net.conv1", filters=[0, 1], mode="values", values=[[[[0.0] * 5] * 5] * 3]),
     "list of 2 filter(s)"),
    (R, C("reinit_filters", layer="net.conv1", filters=[0], mode="values", values=[[["a"] * 5] * 3]),
     "not a nested list of numbers"),
    (R, C("reinit_filters", layer="net.conv2", filters=[0], mode="random", neighbours=[1]), "do not apply to mode"),
    # A weight computed on each forward (pruning, weight_norm): widen left a pruned model broken; reinit and filter
    # freezes were acknowledged and changed nothing.
    ("pruned", C("widen", layer="net.conv2", count=1), "the weight of net.conv2 is pruned"),
    ("pruned", C("remove_filters", layer="net.conv2", filters=[0]), "the weight of net.conv2 is pruned"),
    ("pruned", C("reinit_filters", layer="net.conv2", filters=[0], mode="random"), "net.conv2 is pruned"),
    ("pruned", C("freeze", layer="net.conv2", filters=[0]), "net.conv2 is pruned"),
    ("pruned_reader", C("widen", layer="net.conv2", count=1), "the weight of net.conv3 is pruned"),
    ("weightnorm", C("widen", layer="net.conv2", count=1), "the weight of net.conv2 is parametrized"),
    ("weightnorm", C("reinit_filters", layer="net.conv2", filters=[0], mode="random"), "net.conv2 is parametrized"),
    ("widthcheck", C("widen", layer="a", count=1), "the model's forward failed after the change (ValueError: "
                                                   "expected 4 channels, got 5); the change was undone"),
]


def _make(kind):
    torch.manual_seed(0)
    x, y = batch(n=4)
    example = x
    if kind in ("depthwise", "headless", "shared", "permute", "upsample", "widthcheck"):
        module = {"depthwise": DepthwiseNet, "headless": HeadlessNet, "shared": SharedNet,
                  "permute": PermuteNet, "upsample": UpsampleNet, "widthcheck": WidthCheckNet}[kind]()
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    else:
        module = build(N if kind == N else R)
        if kind in ("pruned", "pruned_reader"):
            torch.nn.utils.prune.l1_unstructured(module.net.conv2 if kind == "pruned" else module.net.conv3,
                                                 "weight", amount=0.3)
        elif kind == "weightnorm":
            module.net.conv2 = torch.nn.utils.parametrizations.weight_norm(module.net.conv2)
        if kind == "adagrad":
            optimizer = torch.optim.Adagrad(module.parameters(), lr=0.01)
        else:
            optimizer = make_optimizer(module, "adamw" if kind == "adamw" else "sgd")
        if kind == "noinput":
            example = None
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    step(module, optimizer, x, y)
    sched.step()
    return module, optimizer, sched, example


@pytest.mark.parametrize("kind,command,words", BAD, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD)])
def test_bad_command_is_refused_and_changes_nothing(kind, command, words):
    module, optimizer, sched, example = _make(kind)
    engine = SteeringEngine(module, [optimizer], [sched], example_input=example)
    before = snapshot(module, optimizer)
    params = [id(p) for p in module.parameters()]
    flags = [p.requires_grad for p in module.parameters()]
    sched_before = sched.state_dict()
    modes = [m.training for m in module.modules()]
    ack = engine.apply(command)
    assert ack["ok"] is False
    assert words in ack["error"], ack["error"]
    assert ack["structural"] is False and ack["changes"] == {} and ack["filter_maps"] == {}
    assert_same_state(before, snapshot(module, optimizer))
    assert [id(p) for p in module.parameters()] == params
    assert [p.requires_grad for p in module.parameters()] == flags
    assert sched.state_dict() == sched_before
    assert [m.training for m in module.modules()] == modes
    assert engine.changelog == [] and engine.frozen() == {}


def test_table_is_large_enough():
    assert len(BAD) >= 30


def test_internal_failure_rolls_back(monkeypatch):
    """An unexpected failure half-way through a structural op is rolled back and reported, not raised."""
    from revacnn.steering import engine as engine_mod

    module, optimizer, sched, example = _make(R)
    engine = SteeringEngine(module, [optimizer], [sched], example_input=example)
    before = snapshot(module, optimizer)
    params = [id(p) for p in module.parameters()]

    def boom(*a, **k):
        raise RuntimeError("simulated")

    monkeypatch.setattr(engine_mod, "apply_records", boom)
    ack = engine.apply(C("widen", layer="net.conv2", count=2))
    assert ack["ok"] is False and "internal error" in ack["error"] and "simulated" in ack["error"]
    assert_same_state(before, snapshot(module, optimizer))
    assert [id(p) for p in module.parameters()] == params
    assert module.net.conv2.out_channels == 20 and module.net.conv3.in_channels == 20
    assert engine.changelog == []
