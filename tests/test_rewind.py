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
