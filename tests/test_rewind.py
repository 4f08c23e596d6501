"""Rewind through a real Trainer: to a periodic restore point by step, bitwise; the run goes on as a new branch, and
the recording's torch-free reader returns each branch's series as it was trained."""

from __future__ import annotations

import numpy as np
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import DigitsDataModule, ReVACNNNet
from revacnn.recording import open_run
from revacnn.steering.restore_store import RestorePolicy

from helpers import quiet_trainer
from undo_support import Observer, ScheduledClassifier, Sequence, same, steered_batches


def test_rewind_to_periodic_points_makes_branches_the_reader_returns(tmp_path):
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, run_dir=tmp_path / "run",
                               restore_points=RestorePolicy(every_steps=5))
    before, after = Observer(callback), Observer(callback)
    script = Sequence(callback, [("rewind", {"step": 12}), ("rewind", {"point": 999}), ("rewind", {"step": 7})],
                      start=16, gap=4)
    torch.manual_seed(0)
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=12, limit_val_batches=0,
                            callbacks=[before, callback, after, script], default_root_dir=tmp_path,
                            num_sanity_val_steps=0)
    trainer.fit(ScheduledClassifier(ReVACNNNet(), lr=0.05), DigitsDataModule(batch_size=32))

    assert [a["status"] for a in script.acks] == ["done", "error", "done"], script.acks
    assert "no restore point 999" in script.acks[1]["error"]
    first, second = steered_batches(before, after)
    # the periodic point at step 10 is the state the batch at step 10 started from (no command there)
    at_ten = next(i for i, s in enumerate(before.states) if s["step"] == 10)
    assert same(after.states[first], before.states[at_ten])
    at_five = next(i for i, s in enumerate(before.states) if s["step"] == 5)
    assert same(after.states[second], before.states[at_five])
    result = script.acks[0]["result"]
    assert result["restore_point"]["kind"] == "periodic" and result["step"] == 10
    assert result["branch"]["parent"] == 0 and result["branch"]["from_step"] == 10
    assert trainer.global_step == 36 - (before.states[first]["step"] - 10) - (before.states[second]["step"] - 5)

    # the recording: each branch's own steps and losses are the ones trained, in order
    reader = open_run(tmp_path / "run")
    tree = reader.branches()
    assert [(b["branch"], b["parent"], b["from_step"]) for b in tree] == [(0, None, 0), (1, 0, 10), (2, 1, 5)]
    steps, losses = np.array(script.steps), np.array(script.losses)
    trained = {0: slice(0, first), 1: slice(first, second), 2: slice(second, len(steps))}
    for branch, rows in trained.items():
        own = reader.scalars(branch=branch, own=True)
        np.testing.assert_array_equal(own["step"], steps[rows])
        np.testing.assert_allclose(own["loss"], losses[rows], rtol=1e-6)
    # the series leading to the current state: branch 0 to step 5, then branch 2
    current = reader.scalars()
    expected = np.concatenate([steps[:first][steps[:first] <= 5], steps[second:]])
    np.testing.assert_array_equal(current["step"], expected)
    np.testing.assert_array_equal(reader.scalars(branch=2)["step"], expected)
    path_one = reader.scalars(branch=1)
    np.testing.assert_array_equal(path_one["step"], np.concatenate([steps[:first][steps[:first] <= 10],
                                                                    steps[first:second]]))


def test_a_checkpoint_taken_after_an_undo_resumes_and_loads_with_load_steered(tmp_path):
    """widen, insert_layer, then undo (the insert is taken back, the widen stays): the checkpoint holds the change
    log of the restored state, so it resumes with ``fit(ckpt_path=…)`` and loads offline to the same outputs."""
    from revacnn import load_steered

    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Sequence(callback, [("widen", {"layer": "net.conv2", "count": 2}),
                                 ("insert_layer", {"after": "net.conv1"}), ("undo", {})])
    torch.manual_seed(0)
    model = ScheduledClassifier(ReVACNNNet(), lr=0.05)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=12, limit_val_batches=0,
                            callbacks=[callback, script], default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert [a["status"] for a in script.acks] == ["done"] * 3, script.acks
    assert [c["op"] for c in script.acks[2]["result"]["taken_back"]] == ["insert_layer"]
    path = tmp_path / "after-undo.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert [entry.get("op") for entry in saved["revacnn"]["changelog"]] == ["widen"]
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(images)
        offline = load_steered(path, ScheduledClassifier(ReVACNNNet())).eval()
        assert torch.equal(offline(images), expected)
    assert isinstance(offline.net.conv1, torch.nn.Conv2d) and offline.net.conv2.weight.shape[0] == 22

    resumed = ScheduledClassifier(ReVACNNNet(), lr=0.05)
    again = quiet_trainer(max_epochs=3, limit_train_batches=12, limit_val_batches=0, default_root_dir=tmp_path,
                          callbacks=[ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)],
                          num_sanity_val_steps=0)
    again.fit(resumed, DigitsDataModule(batch_size=32), ckpt_path=path)
    assert again.global_step == trainer.global_step + 12
    assert resumed.net.conv2.weight.shape[0] == 22
    assert all(torch.isfinite(p).all() for p in resumed.parameters())
