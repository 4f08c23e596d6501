"""FilterProbe's two reductions (numpy on CPU, segment_reduce elsewhere) against values computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from revacnn.telemetry.probes import FilterProbe, discover_layers


def small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 5, padding=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # the GPU run of benchmarks/RESULTS.md


def host(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float64)


def expected(net: nn.Module, before: dict[str, np.ndarray] | None, activations: dict[str, np.ndarray]):
    """Per filter, from the module's own tensors: mean |g|, mean g², ‖w‖, ‖w − w_prev‖/‖w_prev‖, mean |a|."""
    columns, ratios = [], []
    for name, module in discover_layers(net):
        w = host(module.weight).reshape(module.weight.shape[0], -1)
        g = np.zeros_like(w) if module.weight.grad is None else host(module.weight.grad).reshape(w.shape)
        update = (np.zeros(len(w)) if before is None
                  else np.linalg.norm(w - before[name], axis=1) / np.linalg.norm(before[name], axis=1))
        columns.append(np.stack([np.abs(g).mean(1), (g ** 2).mean(1), np.linalg.norm(w, axis=1), update,
                                 activations[name]]))
        ratios.append(np.sqrt((g ** 2).sum() / (w ** 2).sum()))
    return np.concatenate(columns, axis=1), np.array(ratios)


def step(net, probe, optimizer, batches):
    """Arm, forward and backward each batch (an accumulated gradient), recording each forward's mean |activation|
    per channel independently, and measure; then an optimizer step. The expected activation of a filter is the mean
    of its means over the batches."""
    seen = {}

    def record(name, output):
        values = np.abs(host(output))
        means = values.swapaxes(0, 1).reshape(output.shape[1], -1).mean(1) if output.dim() == 4 else values.mean(0)
        seen.setdefault(name, []).append(means)

    handles = [module.register_forward_hook(lambda m, i, o, name=name: record(name, o))
               for name, module in discover_layers(net)]
    probe.arm()
    optimizer.zero_grad()
    for images in batches:
        net(images).square().mean().backward()
    for handle in handles:
        handle.remove()
    filters, layer_ratio = probe.measure()
    return host(filters), host(layer_ratio), {name: np.mean(means, axis=0) for name, means in seen.items()}


@pytest.mark.parametrize("device,strategy", [("cpu", None), ("cpu", "layers"), ("cpu", "segments"),
                                             *((device, None) for device in DEVICES[1:])])
def test_per_filter_fields_equal_independent_values_over_steps_and_with_a_frozen_layer(device, strategy):
    net = small_net().to(device)
    layers = discover_layers(net)
    probe = FilterProbe(layers, strategy=strategy)
    probe.attach()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    images = torch.randn(4, 3, 8, 8, device=device)
    before = None
    for index in range(4):
        if index == 2:  # freeze the middle conv: no gradient, reported as zeros
            net[2].weight.requires_grad_(False)
            net[2].weight.grad = None
        # the last step accumulates two batches of different sizes
        batches = [images] if index < 3 else [images, images[:2] * 3]
        filters, layer_ratio, activations = step(net, probe, optimizer, batches)
        want, want_ratio = expected(net, before, activations)
        np.testing.assert_allclose(filters, want, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(layer_ratio, want_ratio, rtol=2e-5, atol=1e-7)
        if index >= 2:
            assert not filters[:2, 6:10].any() and filters[2, 6:10].all()
        before = {name: host(module.weight).reshape(module.weight.shape[0], -1) for name, module in layers}
        optimizer.step()
        assert filters.shape == (5, 6 + 4 + 5)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("count", [1, 3])
def test_flatten_copies_the_tensors_one_after_the_other(count, contiguous):
    from revacnn.telemetry.probes import flatten

    tensors = [torch.randn(4, 3, 2) if contiguous else torch.randn(4, 3, 2).transpose(0, 2) for _ in range(count)]
    flat = flatten(tensors)
    assert torch.equal(flat, torch.cat([tensor.contiguous().view(-1) for tensor in tensors]))
    tensors[0].fill_(7.0)  # the result is a copy: the measured weights are kept to compare with the next ones
    assert not torch.any(flat == 7.0)


def test_a_single_monitored_layer_reports_its_update_ratio():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    probe = FilterProbe([("fc", layer)], strategy="segments")
    layer(torch.randn(5, 6)).sum().backward()
    probe.measure()
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.1)
    filters, _ = probe.measure()
    want = (layer.weight.detach() - before).norm(dim=1) / before.norm(dim=1)
    assert torch.allclose(filters[3], want, rtol=1e-5)
    assert filters[3].min() > 0


@pytest.mark.parametrize("strategy", ["segments", "layers"])
def test_a_float64_default_dtype_changes_nothing(strategy):
    """A user's ``torch.set_default_dtype(torch.float64)`` with a float32 model: the fields are float32 and the same."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    layer(torch.randn(5, 6)).sum().backward()
    want = FilterProbe([("fc", layer)], strategy=strategy).measure()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = FilterProbe([("fc", layer)], strategy=strategy).measure()
    finally:
        torch.set_default_dtype(default)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        FilterProbe([], strategy="fast")


@pytest.mark.parametrize("size", [1, 7, 1200, 10_000])
@pytest.mark.parametrize("quartiles", ["numpy (CPU)", "torch (other devices, run here on the CPU)"])
def test_tensor_stats_equal_torch_quantile_and_independent_values(size, quartiles, monkeypatch):
    from revacnn.telemetry import statistics
    from revacnn.wire.protocol import STAT_FIELDS

    if quartiles.startswith("torch"):  # the device path's quartiles, on CPU tensors
        monkeypatch.setattr(statistics, "_quartiles_numpy",
                            lambda values: statistics._quartiles_torch(torch.from_numpy(values)).numpy())
    torch.manual_seed(size)
    tensor = torch.randn(size) * 3
    tensor[::5] = 0.0
    stats = dict(zip(STAT_FIELDS, statistics.tensor_stats(tensor.reshape(-1, 1)).tolist()))
    want_quartiles = torch.quantile(tensor, torch.tensor([0.25, 0.5, 0.75])).tolist()
    values = tensor.double().numpy()
    want = {"min": values.min(), "max": values.max(), "mean": values.mean(), "median": want_quartiles[1],
            "q1": want_quartiles[0], "q3": want_quartiles[2], "std": values.std(), "l1": np.abs(values).sum(),
            "l2": np.linalg.norm(values), "l0": np.count_nonzero(values), "count": size}
    for field in STAT_FIELDS:
        assert stats[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field


def test_tensor_stats_of_a_large_tensor_are_exact_but_for_sampled_quartiles():
    """Above QUARTILE_SAMPLE values the quartiles come from a fixed sample: within 2 % of the std of the exact ones
    (a standard error of ~0.5 %), the same at every call; every other statistic is exact."""
    from revacnn.telemetry.statistics import QUARTILE_SAMPLE, tensor_stats
    from revacnn.wire.protocol import STAT_FIELDS

    torch.manual_seed(3)
    tensor = torch.randn(64, 64, 3, 3) * 0.1 + 0.02   # 36,864 · 8 > QUARTILE_SAMPLE values, a conv weight's shape
    tensor = torch.cat([tensor] * 8)
    assert tensor.numel() > QUARTILE_SAMPLE
    stats = dict(zip(STAT_FIELDS, tensor_stats(tensor).tolist()))
    values = tensor.double().numpy().reshape(-1)
    exact = np.quantile(values, [0.25, 0.5, 0.75])
    for field, want in zip(("q1", "median", "q3"), exact):
        assert abs(stats[field] - want) < 0.02 * values.std(), field
    assert torch.equal(tensor_stats(tensor), tensor_stats(tensor.clone()))
    for field, want in (("min", values.min()), ("max", values.max()), ("mean", values.mean()), ("std", values.std()),
                        ("l1", np.abs(values).sum()), ("l2", np.linalg.norm(values)), ("count", values.size)):
        assert stats[field] == pytest.approx(want, rel=1e-5), field


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("strategy", ["layers", "segments"])
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

    from revacnn.telemetry.activations import logits_of

    logits = torch.randn(4, 10)
    assert logits_of(logits) is logits
    assert logits_of((logits, torch.randn(4, 3))) is logits and logits_of([logits]) is logits
    assert logits_of({"features": torch.randn(4, 3), "logits": logits}) is logits
    assert logits_of(SimpleNamespace(loss=None, logits=logits)) is logits  # a Hugging Face ModelOutput's attribute
    with pytest.raises(TypeError, match="forward returned dict, not a tensor of logits"):
        logits_of({"scores": logits})
    with pytest.raises(TypeError, match="forward returned tuple"):
        logits_of(())
