"""set_hparams: immediate effect, and schedulers continue from the new value."""

from __future__ import annotations


import pytest
import torch
from steering_util import build, cmd

from revacnn.steering import SteeringEngine


def _opt(kind="sgd", lr=0.1):
    module = build("revacnn")
    if kind == "sgd":
        return module, torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    return module, torch.optim.AdamW(module.parameters(), lr=lr)


def _tick(opt, sched, n=1):
    for _ in range(n):
        opt.step()
        sched.step()


def test_immediate_lr_momentum_weight_decay_sgd():
    module, opt = _opt("sgd")
    engine = SteeringEngine(module, [opt])
    ack = engine.apply(cmd("set_hparams", lr=0.02, momentum=0.5, weight_decay=1e-3))
    assert ack["ok"], ack["error"]
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.02, 0.5, 1e-3)
    assert ack["changes"]["groups"][0]["lr"] == [0.1, 0.02]


def test_momentum_is_betas0_for_adamw():
    module, opt = _opt("adamw")
    engine = SteeringEngine(module, [opt])
    assert engine.apply(cmd("set_hparams", momentum=0.8))["ok"]
    assert opt.param_groups[0]["betas"] == (0.8, 0.999)


def test_groups_subset():
    module = build("revacnn")
    opt = torch.optim.SGD([{"params": module.net.conv1.parameters()},
                           {"params": [p for n, p in module.named_parameters() if "conv1" not in n]}], lr=0.1)
    engine = SteeringEngine(module, [opt])
    assert engine.apply(cmd("set_hparams", lr=0.5, groups=[1]))["ok"]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]


def test_steplr_continues_from_new_value():
    module, opt = _opt("sgd", lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    engine = SteeringEngine(module, [opt], [sched])
    _tick(opt, sched, 1)  # epoch 1: lr 0.1
    assert engine.apply(cmd("set_hparams", lr=0.02))["ok"]
    assert opt.param_groups[0]["lr"] == 0.02
    _tick(opt, sched, 1)  # epoch 2: decay
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    _tick(opt, sched, 2)  # epoch 4: decay again
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert sched.base_lrs[0] == pytest.approx(0.02)
    assert sched.get_last_lr()[0] == pytest.approx(0.005)


def test_lambdalr_continues_from_new_value():
    module, opt = _opt("sgd", lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e))
    engine = SteeringEngine(module, [opt], [sched])
    _tick(opt, sched, 2)  # lr = 0.1/3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    assert engine.apply(cmd("set_hparams", lr=0.01))["ok"]
    _tick(opt, sched, 1)  # without rescaling LambdaLR would jump back to 0.1/4 = 0.025
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 3 / 4)
    _tick(opt, sched, 1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 3 / 5)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    # these three overrode the new lr at their next step: CyclicLR from its max_lrs, the composite ones from the
    # schedulers inside them
    lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
                                                        torch.optim.lr_scheduler.StepLR(o, 2)], milestones=[5]),
    lambda o: torch.optim.lr_scheduler.ChainedScheduler([torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
                                                         torch.optim.lr_scheduler.StepLR(o, 2)]),
])
def test_other_schedulers_scale_with_the_change(make):
    unchanged, halved = _halved_mid_schedule(make, "lr", after=3)
    assert halved == pytest.approx(unchanged * 0.5, rel=1e-6)


def _halved_mid_schedule(make, key: str, after: int) -> tuple[float, float]:
    """``key`` of group 0 ``after`` scheduler steps past step 4, without and with a ``set_hparams`` halving it at
    step 4 (checked to take effect at once)."""
    results = []
    for change in (False, True):
        module, opt = _opt("sgd", lr=0.1)
        sched = make(opt)
        engine = SteeringEngine(module, [opt], [sched])
        _tick(opt, sched, 4)
        current = opt.param_groups[0][key]
        if change:
            assert engine.apply(cmd("set_hparams", **{key: current * 0.5}))["ok"]
            assert opt.param_groups[0][key] == pytest.approx(current * 0.5)
        _tick(opt, sched, after)
        results.append(opt.param_groups[0][key])
    return results[0], results[1]


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    # CyclicLR cycles momentum from its own base_momentums / max_momentums: it set the old cycle back
    lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
])
def test_cycled_momentum_scales_with_the_change(make):
    unchanged, halved = _halved_mid_schedule(make, "momentum", after=2)
    assert unchanged > 0.5 and halved == pytest.approx(unchanged * 0.5, rel=1e-6)
