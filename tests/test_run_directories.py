"""Where runs are recorded: each fit is a run of its own, in a directory of its own, unless the user names one."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.recording.reader import list_runs, open_run


def fit(callback, root, steps, logger=False):
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, callbacks=[callback], default_root_dir=root,
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=16))
    return open_run(callback.run_dir)


def test_runs_without_a_logger_each_get_a_directory(tmp_path):
    """Without a logger every Trainer's log directory is ``default_root_dir``: the second run went into the first
    one's recording (its steps 1, 2, 3 after 1 … 4)."""
    first = fit(ReVACNNCallback(), tmp_path, 4)
    second = fit(ReVACNNCallback(), tmp_path, 3)
    assert (first.path, second.path) == (tmp_path / "revacnn", tmp_path / "revacnn-2")
    np.testing.assert_array_equal(open_run(first.path).scalars()["step"], [1, 2, 3, 4])
    np.testing.assert_array_equal(second.scalars()["step"], [1, 2, 3])
    assert [run["run_id"] for run in list_runs(tmp_path)] == [first.summary()["run_id"], second.summary()["run_id"]]


def test_a_second_fit_with_the_same_callback_is_a_new_run(tmp_path):
    callback = ReVACNNCallback()
    first = fit(callback, tmp_path, 4, logger=True)
    first_id = callback.run_id
    second = fit(callback, tmp_path, 2, logger=True)
    assert callback.run_id != first_id
    assert first.path == tmp_path / "lightning_logs" / "version_0" / "revacnn"
    assert second.path == tmp_path / "lightning_logs" / "version_1" / "revacnn"
    np.testing.assert_array_equal(open_run(first.path).scalars()["step"], [1, 2, 3, 4])
    np.testing.assert_array_equal(second.scalars()["step"], [1, 2])
    assert second.status()["state"] == "finished"


def test_a_named_run_dir_that_holds_a_run_is_used_with_a_warning(tmp_path):
    """The user named it: it is theirs (a resumed run goes on with its recording), but they are told."""
    run_dir = tmp_path / "exp1"
    fit(ReVACNNCallback(run_dir=run_dir), tmp_path, 2)
    with pytest.warns(UserWarning, match="already holds a recorded run"):
        run = fit(ReVACNNCallback(run_dir=run_dir), tmp_path, 2)
    assert run.path == run_dir
    np.testing.assert_array_equal(run.scalars()["step"], [1, 2, 1, 2])


@pytest.mark.parametrize("tune", ["lr_find", "scale_batch_size"])
def test_a_tuners_trial_fit_leaves_no_run_behind(tmp_path, tune):
    """``Tuner`` runs its trials in a fit of its own, which ends in the finder's ``on_fit_start`` with the user's
    callbacks set aside. That fit opened a run that never trained: an empty ``revacnn`` directory, listed as a run,
    whose connection file was the first one printed, and the real run went to ``revacnn-2``."""
    from pytorch_lightning.tuner import Tuner

    callback = ReVACNNCallback()
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, callbacks=[callback], default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    model, data = ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=16)
    if tune == "lr_find":
        Tuner(trainer).lr_find(model, datamodule=data, num_training=4, update_attr=False)
    else:
        Tuner(trainer).scale_batch_size(model, datamodule=data, max_trials=2, steps_per_trial=1)
    trainer.fit(model, data)
    assert [run["path"] for run in list_runs(tmp_path)] == [str(tmp_path / "revacnn")]
    run = open_run(tmp_path / "revacnn")
    np.testing.assert_array_equal(run.scalars()["step"], [1, 2, 3])
    assert run.summary()["run_id"] == callback.run_id
