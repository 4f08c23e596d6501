"""The overhead benchmark's alternating windows: which steps reach the measured callbacks, which are timed, and how
on windows are paired with their neighbours. Book-keeping only — no timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from revacnn.telemetry import probes
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.telemetry.probes import FilterProbe

from helpers import quiet_trainer

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
_spec = importlib.util.spec_from_file_location("revacnn_benchmark_overhead", _PATH)
overhead = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = overhead
_spec.loader.exec_module(overhead)


class Counting(pl.Callback):
    """Records the global step of every per-batch hook it receives, and which lifecycle hooks ran."""

    def __init__(self) -> None:
        self.batch_starts: list[int] = []
        self.optimizer_steps: list[int] = []
        self.batch_ends: list[int] = []
        self.lifecycle: list[str] = []

    def setup(self, trainer, pl_module, stage):
        self.lifecycle.append("setup")

    def on_train_start(self, trainer, pl_module):
        self.lifecycle.append("on_train_start")

    def on_train_end(self, trainer, pl_module):
        self.lifecycle.append("on_train_end")

    def teardown(self, trainer, pl_module, stage):
        self.lifecycle.append("teardown")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_starts.append(trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer_steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_ends.append(trainer.global_step)


def test_per_batch_hooks_run_only_in_on_windows_and_on_windows_pair_with_both_neighbours(tmp_path):
    window, settle, pairs = 6, 2, 3
    counting = Counting()
    windows = overhead.AlternatingWindows([counting], window, settle)
    torch.manual_seed(0)
    trainer = quiet_trainer(accelerator="cpu", devices=1, max_steps=window * (2 * pairs + 2), max_epochs=-1,
                            limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[windows])
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.02), DigitsDataModule(batch_size=8))

    # windows 0 (warm-up) and 1 are off, then on and off alternate: on windows are 2, 4, 6; the fit ends with 7 off
    on_steps = [step for index in (2, 4, 6) for step in range(index * window, (index + 1) * window)]
    assert counting.batch_starts == on_steps
    assert counting.optimizer_steps == on_steps                # the step's global_step before the optimizer step
    assert counting.batch_ends == [step + 1 for step in on_steps]
    assert counting.lifecycle == ["setup", "on_train_start", "on_train_end", "teardown"]

    assert [record[0] for record in windows.windows] == [False, False, True, False, True, False, True, False]
    # every window times all of its steps but the first ``settle``, the last one closed by on_train_end
    assert [record[1] for record in windows.windows] == [window - settle] * (2 * pairs + 2)
    assert all(record[2] > 0 for record in windows.windows)

    # each on window is divided by the mean of the two off windows either side (the warm-up is never used)
    rates = [steps / seconds for _, steps, seconds in windows.windows]
    expected = [rates[index] / ((rates[index - 1] + rates[index + 1]) / 2) for index in (2, 4, 6)]
    assert windows.ratios() == expected
    assert windows.rate(True) == sorted(rates[index] for index in (2, 4, 6))[1]


def _measured_step(probe: FilterProbe, layer: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    layer.weight.grad = None
    probe.arm()
    layer(torch.randn(4, 1, 6, 6)).sum().backward()
    return probe.measure()


def test_ablation_stand_ins_replace_only_the_parts_named_and_are_put_back():
    torch.manual_seed(0)
    layer = nn.Conv2d(1, 3, 3)
    probe = FilterProbe([("conv", layer)])
    probe.attach()
    reduction, measure = probes.channel_abs_sum, FilterProbe.measure

    with overhead.stand_ins({"activation"}):
        filters, _ = _measured_step(probe, layer)
    assert torch.all(filters[4] == 0)                          # mean |activation| stood in by zeros
    assert torch.all(filters[0] > 0) and torch.all(filters[2] > 0)   # the sums still computed

    with overhead.stand_ins({"sums"}):
        first = _measured_step(probe, layer)
        with torch.no_grad():
            layer.weight.mul_(2.0)
        again = _measured_step(probe, layer)
        assert not probe.armed and probe._activations == {}
    assert again[0] is first[0] and again[1] is first[1]     # one step's values, returned again
    assert torch.all(first[0][4] > 0)                          # … its real mean |activation|

    assert probes.channel_abs_sum is reduction and FilterProbe.measure is measure
    after, _ = _measured_step(probe, layer)
    assert after is not first[0] and torch.all(after[4] > 0) and torch.all(after[3] > 0)


def test_floor_pairs_each_mode_with_the_off_blocks_either_side():
    seconds = iter([9.0, 9.0, 9.0,            # the untimed block of each mode
                    1.0, 2.0, 1.2, 3.0, 1.4,  # off, sums, off, armed, off
                    2.5, 1.6, 4.0, 1.8])      # … the second round: sums, off, armed, off
    calls = []

    def run_block(mode, steps):
        calls.append((mode, steps))
        return next(seconds)

    floor = overhead.measurement_floor(2, run_block, block=5)
    assert calls == [(None, 5), (False, 5), (True, 5)] + [(None, 5), (False, 5), (None, 5), (True, 5)] * 2 + [
        (None, 5)]
    sums, armed = (floor[name] for name in overhead.FLOOR_MODES)

    def ratio(on: float, before: float, after: float) -> float:  # of rates, i.e. steps / seconds
        return (5 / on) / ((5 / before + 5 / after) / 2)

    assert sums.ratios() == pytest.approx([ratio(2.0, 1.0, 1.2), ratio(2.5, 1.4, 1.6)])
    assert armed.ratios() == pytest.approx([ratio(3.0, 1.2, 1.4), ratio(4.0, 1.6, 1.8)])


def test_floor_loop_measures_as_its_mode_says_and_trains():
    args = SimpleNamespace(device="cpu", model="revacnn", widths=(8,))
    data = DigitsDataModule(batch_size=8)
    data.setup()
    measured = []
    original = FilterProbe.measure

    def spy(probe):
        result = original(probe)
        measured.append((len(probe._handles), result[0][4].clone(), result[0][2].clone()))
        return result

    FilterProbe.measure = spy
    try:
        run_block = overhead.plain_loop(args, data)
        assert run_block(None, 2) > 0 and measured == []
        run_block(False, 2)
        assert [hooks for hooks, _, _ in measured] == [0, 0]        # sums only: no forward hooks attached
        assert all(torch.all(activation == 0) for _, activation, _ in measured)
        assert not torch.equal(measured[0][2], measured[1][2])     # the optimizer stepped between: new weight norms
        measured.clear()
        run_block(True, 2)
        assert [hooks for hooks, _, _ in measured] == [4, 4]        # the demo net's 3 convs and its linear layer
        assert all(torch.all(activation > 0) for _, activation, _ in measured)
        run_block(None, 1)
        assert len(measured) == 2
    finally:
        FilterProbe.measure = original
