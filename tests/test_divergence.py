"""The divergence guard with a real Trainer: a NaN planted in the weights makes the loss non-finite; the guard
rewinds to the latest restore point before it (bitwise) and training goes on finite, or it warns, or it pauses."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import pytest
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import DigitsDataModule, ReVACNNNet
from revacnn.recording import open_run
from revacnn.steering.divergence import DivergenceGuard, DivergenceRule
from revacnn.steering.restore_store import RestorePolicy

from helpers import quiet_trainer
from undo_support import Observer, ScheduledClassifier, Sequence, same


class PlantNaN(pl.Callback):
    """Writes a NaN into one weight at the start of the batch at ``step`` (once)."""

    def __init__(self, step: int) -> None:
        self.step, self.planted = step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.planted:
            self.planted = True
            with torch.no_grad():
                pl_module.net.conv1.weight[0, 0, 0, 0] = float("nan")


def run(tmp_path, action):
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, run_dir=tmp_path / "run", on_divergence=action,
                               restore_points=RestorePolicy(every_steps=5))
    before, after = Observer(callback), Observer(callback)
    script = Sequence(callback, [])
    torch.manual_seed(0)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=12, limit_val_batches=0,
                            callbacks=[PlantNaN(8), before, callback, after, script], default_root_dir=tmp_path,
                            num_sanity_val_steps=0)
    trainer.fit(ScheduledClassifier(ReVACNNNet(), lr=0.05), DigitsDataModule(batch_size=32))
    return trainer, callback, script, before, after


def test_guard_rewinds_a_planted_nan_to_the_point_before_it(tmp_path):
    trainer, callback, script, before, after = run(tmp_path, "rewind")
    (ack,) = script.acks
    assert ack["id"] == "divergence-1" and ack["op"] == "rewind" and ack["status"] == "done"
    divergence = ack["result"]["divergence"]
    assert divergence["step"] == 9 and divergence["loss"] is None and divergence["reason"] == "non-finite loss"
    assert ack["result"]["restore_point"]["step"] == 5 and ack["result"]["branch"]["reason"] == "divergence"
    # every loss from the planted NaN until the rewind is NaN; all after it are finite
    bad = script.steps.index(9)
    rewound = next(i for i in range(bad, len(after.states)) if after.states[i]["step"] == 5)
    assert all(math.isnan(loss) for loss in script.losses[bad:rewound])
    assert all(math.isfinite(loss) for loss in script.losses[rewound:])
    at_five = next(i for i, s in enumerate(before.states) if s["step"] == 5)
    assert same(after.states[rewound], before.states[at_five])
    assert trainer.global_step == 24 - (before.states[rewound]["step"] - 5)
    reader = open_run(tmp_path / "run")
    assert [b["reason"] for b in reader.branches()] == ["start", "divergence"]
    assert reader.status()["divergence"]["restore_point"] == ack["result"]["restore_point"]["id"]


def test_guard_warns_and_training_goes_on(tmp_path):
    trainer, callback, script, before, after = run(tmp_path, "warn")
    assert script.acks == []
    assert trainer.global_step == 24
    divergence = open_run(tmp_path / "run").status()["divergence"]
    assert divergence["step"] == 9 and divergence["action"] == "warn" and divergence["count"] == 1


def test_spike_rule():
    guard = DivergenceGuard("warn", DivergenceRule(spike=10.0, window=50, min_history=10))
    for step in range(1, 11):
        guard.observe(step, torch.tensor(2.0 + 0.01 * step))
    assert guard.poll() is None
    guard.observe(11, torch.tensor(20.0))        # 20 / median 2.055 < 10× … not yet
    assert guard.poll() is None
    guard.observe(12, torch.tensor(30.0))
    fired = guard.poll()
    assert fired["step"] == 12 and fired["loss"] == 30.0 and "10×" in fired["reason"]


@pytest.mark.parametrize("action", ["rewind", "pause"])
def test_guard_without_a_point_before_pauses(action):
    guard = DivergenceGuard(action)
    guard.observe(3, torch.tensor(float("inf")))
    info = guard.poll()
    command = guard.respond(info, None)
    assert command["op"] == "pause" and command["divergence"]["action"] == "pause"
