"""FilterProbe's two reductions (numpy on CPU, segment_reduce elsewhere) against values computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from revacnn.probes import FilterProbe, discover_layers


def small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 5, padding=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def expected(net: nn.Module, before: dict[str, np.ndarray] | None, activations: dict[str, np.ndarray]):
    """Per filter, from the module's own tensors: mean |g|, mean g², ‖w‖, ‖w − w_prev‖/‖w_prev‖, mean |a|."""
    columns, ratios = [], []
    for name, module in discover_layers(net):
        w = module.weight.detach().numpy().reshape(module.weight.shape[0], -1).astype(np.float64)
        g = (np.zeros_like(w) if module.weight.grad is None
             else module.weight.grad.numpy().reshape(w.shape).astype(np.float64))
        update = (np.zeros(len(w)) if before is None
                  else np.linalg.norm(w - before[name], axis=1) / np.linalg.norm(before[name], axis=1))
        columns.append(np.stack([np.abs(g).mean(1), (g ** 2).mean(1), np.linalg.norm(w, axis=1), update,
                                 activations[name]]))
        ratios.append(np.sqrt((g ** 2).sum() / (w ** 2).sum()))
    return np.concatenate(columns, axis=1), np.array(ratios)


def step(net, probe, optimizer, images):
    """Arm, forward (recording |activation| independently), backward, measure; then an optimizer step."""
    seen = {}
    handles = [module.register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, o.detach().abs().numpy().astype(np.float64)
                                                    .swapaxes(0, 1).reshape(o.shape[1], -1).mean(1)
                                                    if o.dim() == 4 else o.detach().abs().numpy().mean(0)))
        for name, module in discover_layers(net)]
    probe.arm()
    optimizer.zero_grad()
    net(images).square().mean().backward()
    for handle in handles:
        handle.remove()
    filters, layer_ratio = probe.measure()
    return filters.numpy(), layer_ratio.numpy(), seen


@pytest.mark.parametrize("strategy", [None, "numpy", "segments"])
def test_per_filter_fields_equal_independent_values_over_steps_and_with_a_frozen_layer(strategy):
    net = small_net()
    layers = discover_layers(net)
    probe = FilterProbe(layers, strategy=strategy)
    probe.attach()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    images = torch.randn(4, 3, 8, 8)
    before = None
    for index in range(3):
        if index == 2:  # freeze the middle conv: no gradient, reported as zeros
            net[2].weight.requires_grad_(False)
            net[2].weight.grad = None
        filters, layer_ratio, activations = step(net, probe, optimizer, images)
        want, want_ratio = expected(net, before, activations)
        np.testing.assert_allclose(filters, want, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(layer_ratio, want_ratio, rtol=2e-5, atol=1e-7)
        if index == 2:
            assert not filters[:2, 6:10].any() and filters[2, 6:10].all()
        before = {name: module.weight.detach().numpy().reshape(module.weight.shape[0], -1).astype(np.float64)
                  for name, module in layers}
        optimizer.step()
        assert filters.shape == (5, 6 + 4 + 5)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        FilterProbe([], strategy="fast")


@pytest.mark.parametrize("size", [1, 7, 1200, 10_000])
@pytest.mark.parametrize("path", ["numpy (CPU)", "torch (other devices, run here on the CPU)"])
def test_tensor_stats_equal_torch_quantile_and_independent_values(size, path):
    from revacnn.probes import tensor_stats, torch_stats
    from revacnn.protocol import STAT_FIELDS

    torch.manual_seed(size)
    tensor = torch.randn(size) * 3
    tensor[::5] = 0.0
    stats_of = tensor_stats if path.startswith("numpy") else lambda t: torch_stats(t.reshape(-1), t.reshape(-1))
    stats = dict(zip(STAT_FIELDS, stats_of(tensor.reshape(-1, 1)).tolist()))
    quartiles = torch.quantile(tensor, torch.tensor([0.25, 0.5, 0.75])).tolist()
    values = tensor.double().numpy()
    want = {"min": values.min(), "max": values.max(), "mean": values.mean(), "median": quartiles[1],
            "q1": quartiles[0], "q3": quartiles[2], "std": values.std(), "l1": np.abs(values).sum(),
            "l2": np.linalg.norm(values), "l0": np.count_nonzero(values), "count": size}
    for field in STAT_FIELDS:
        assert stats[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("strategy", ["numpy", "segments"])
def test_a_transposed_conv_is_measured_per_output_channel(strategy, groups):
    """ConvTranspose2d keeps its weight as [in, out / groups, kh, kw]: output channel o of group gi is
    weight[gi·in/g : (gi+1)·in/g, o mod out/g]. Each filter is one output channel, as the activations are."""
    torch.manual_seed(5)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), up)
    layers = discover_layers(net, [nn.Conv2d, nn.ConvTranspose2d])
    probe = FilterProbe(layers, strategy=strategy)
    probe.attach()
    probe.arm()
    output = net(torch.randn(2, 3, 5, 5))
    output.square().mean().backward()
    filters, layer_ratio = (t.numpy() for t in probe.measure())
    assert filters.shape == (5, 4 + 6)

    weight, grad = up.weight.detach().double().numpy(), up.weight.grad.double().numpy()
    in_per, out_per = 4 // groups, 6 // groups
    for o in range(6):
        rows = slice(o // out_per * in_per, (o // out_per + 1) * in_per)
        w, g = weight[rows, o % out_per], grad[rows, o % out_per]
        assert filters[0, 4 + o] == pytest.approx(np.abs(g).mean(), rel=1e-5)
        assert filters[1, 4 + o] == pytest.approx((g ** 2).mean(), rel=1e-5)
        assert filters[2, 4 + o] == pytest.approx(np.linalg.norm(w), rel=1e-5)
        assert filters[4, 4 + o] == pytest.approx(np.abs(output[:, o].detach().double().numpy()).mean(), rel=1e-5)
    assert layer_ratio[1] == pytest.approx(np.linalg.norm(grad) / np.linalg.norm(weight), rel=1e-5)


def test_logits_are_found_in_what_forward_returns():
    from types import SimpleNamespace

    from revacnn.probes import logits_of

    logits = torch.randn(4, 10)
    assert logits_of(logits) is logits
    assert logits_of((logits, torch.randn(4, 3))) is logits and logits_of([logits]) is logits
    assert logits_of({"features": torch.randn(4, 3), "logits": logits}) is logits
    assert logits_of(SimpleNamespace(loss=None, logits=logits)) is logits  # a Hugging Face ModelOutput's attribute
    with pytest.raises(TypeError, match="forward returned dict, not a tensor of logits"):
        logits_of({"scores": logits})
    with pytest.raises(TypeError, match="forward returned tuple"):
        logits_of(())
