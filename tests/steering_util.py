"""Shared helpers for the steering tests (not a test module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from revacnn.demo.models import ClassifierModule, ReVACNNNet, SmallResNet
from revacnn.steering import SteeringEngine

MODELS = ("revacnn", "resnet")
OPTIMIZERS = ("sgd", "adamw")


def build(kind: str, seed: int = 0) -> ClassifierModule:
    torch.manual_seed(seed)
    net = ReVACNNNet() if kind == "revacnn" else SmallResNet()
    return ClassifierModule(net)


def make_optimizer(module: nn.Module, opt: str):
    if opt == "sgd":
        return torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if opt == "adamw":
        return torch.optim.AdamW(module.parameters(), lr=2e-3, weight_decay=1e-2)
    if opt == "adam":
        return torch.optim.Adam(module.parameters(), lr=2e-3)
    if opt == "rmsprop":
        return torch.optim.RMSprop(module.parameters(), lr=1e-3, momentum=0.9)
    raise ValueError(opt)


def batch(seed: int = 1, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def step(module, optimizer, x, y) -> float:
    module.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def setup(kind: str, opt: str, warm_steps: int = 3, **engine_kwargs):
    """A model trained a few steps (so optimizer state exists), its optimizer, data and an engine."""
    module = build(kind)
    optimizer = make_optimizer(module, opt)
    x, y = batch()
    for _ in range(warm_steps):
        step(module, optimizer, x, y)
    engine = SteeringEngine(module, [optimizer], example_input=x, **engine_kwargs)
    return module, optimizer, x, y, engine


def eval_out(module, x) -> torch.Tensor:
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(x)
    module.train(was)
    return out


def cmd(op: str, **args) -> dict:
    cmd.counter = getattr(cmd, "counter", 0) + 1
    return {"id": f"c{cmd.counter}", "op": op, "args": args}


def assert_optimizer_consistent(module, optimizer) -> None:
    """Optimizer params == model params, same order; state keyed only by live params, shaped like them."""
    model_params = list(module.parameters())
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in opt_params] == [id(p) for p in model_params]
    live = {id(p) for p in model_params}
    for p, state in optimizer.state.items():
        assert id(p) in live, "stale optimizer state key"
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.shape == p.shape, key
    optimizer.state_dict()  # must not raise


def snapshot(module, optimizer):
    return ({k: v.clone() for k, v in module.state_dict().items()}, optimizer.state_dict())


def assert_same_state(a, b) -> None:
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k].shape == mb[k].shape and torch.equal(ma[k], mb[k]), k
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        assert oa["state"][i].keys() == ob["state"][i].keys()
        for key in oa["state"][i]:
            va, vb = oa["state"][i][key], ob["state"][i][key]
            if isinstance(va, torch.Tensor):
                assert va.shape == vb.shape and torch.equal(va, vb), (i, key)
            else:
                assert va == vb


def state_of(optimizer, param, key: str) -> torch.Tensor:
    return optimizer.state[param][key].clone()


MOMENT = {"sgd": "momentum_buffer", "adamw": "exp_avg", "adam": "exp_avg", "rmsprop": "square_avg"}
