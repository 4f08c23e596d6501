"""Where runs are recorded: each fit is a run of its own, in a directory of its own, unless the user names one."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.recording.reader import list_runs, open_run

from helpers import quiet_trainer


def fit(callback, root, steps, logger=False):
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[callback], default_root_dir=root,
                            logger=logger)
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
    """The user named it: it is theirs (a resumed run goes on with its recording), but they are told. The new run's
    steps replace the old run's from its first step on; every row stays on disk."""
    run_dir = tmp_path / "exp1"
    fit(ReVACNNCallback(run_dir=run_dir), tmp_path, 2)
    with pytest.warns(UserWarning, match="already holds a recorded run"):
        run = fit(ReVACNNCallback(run_dir=run_dir), tmp_path, 2)
    assert run.path == run_dir
    np.testing.assert_array_equal(run.scalars()["step"], [1, 2])
    np.testing.assert_array_equal(run.table("scalars").column("step").to_numpy(), [1, 2, 1, 2])


@pytest.mark.parametrize("tune", ["lr_find", "scale_batch_size"])
def test_a_tuners_trial_fit_leaves_no_run_behind(tmp_path, tune):
    """``Tuner`` runs its trials in a fit of its own, which ends in the finder's ``on_fit_start`` with the user's
    callbacks set aside. That fit opened a run that never trained: an empty ``revacnn`` directory, listed as a run,
    whose connection file was the first one printed, and the real run went to ``revacnn-2``."""
    from pytorch_lightning.tuner import Tuner

    callback = ReVACNNCallback()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback], default_root_dir=tmp_path)
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


class LossesAndWeights(pl.Callback):
    """Each optimizer step's loss, and conv1's weight after it."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.weight: dict[int, np.ndarray] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss[trainer.global_step] = float(outputs["loss"])
        self.weight[trainer.global_step] = pl_module.net.conv1.weight.detach().numpy().copy()


def test_a_run_resumed_into_its_recording_replaces_the_steps_the_checkpoint_abandoned(tmp_path):
    """Resumed from its step-4 checkpoint into the run directory it named, a run recorded steps 5 and 6 a second
    time after the first run's 5 and 6: the charts went back in time, the first run's step-6 snapshot was shown for
    the second's, and its validation at step 6 twice. A reader now shows the latest timeline, as TensorBoard does."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def fit_digits(max_steps, witness, *extra, ckpt_path=None):
        callback = ReVACNNCallback(run_dir=tmp_path / "run", filters_every=1, snapshot_every=2)
        trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=2, val_check_interval=3,
                                callbacks=[callback, witness, *extra], default_root_dir=tmp_path,
                                num_sanity_val_steps=0, enable_checkpointing=True)
        torch.manual_seed(0)
        trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)

    first, second = LossesAndWeights(), LossesAndWeights()
    fit_digits(6, first, ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=4, save_top_k=-1))
    with pytest.warns(UserWarning, match="already holds a recorded run"):
        fit_digits(9, second, ckpt_path=tmp_path / "checkpoints" / "epoch=0-step=4.ckpt")
    assert first.loss[5] != second.loss[5]  # the batches after the checkpoint differ: a real branch
    run = open_run(tmp_path / "run")
    scalars = run.scalars()
    np.testing.assert_array_equal(scalars["step"], np.arange(1, 10))
    expected = [first.loss[step] for step in range(1, 5)] + [second.loss[step] for step in range(5, 10)]
    np.testing.assert_allclose(scalars["loss"], expected, rtol=1e-6)
    np.testing.assert_array_equal(run.filter_series("net.conv1", "weight_norm")["step"], np.arange(1, 10))
    np.testing.assert_array_equal(run.layer_series()["step"], np.arange(1, 10))
    np.testing.assert_array_equal(run.val_predictions()["steps"], [3, 6, 9])
    assert run.snapshot_steps() == [1, 2, 4, 6, 8]
    np.testing.assert_array_equal(run.snapshot(6)["arrays"]["weight/net.conv1"], second.weight[6])
    assert run.last_step() == 9
    from revacnn_dash.data.hub import Hub

    hub = Hub([], logdir=str(tmp_path), warm_umap=False)
    try:
        hub.scan_logdir()
        (state,) = hub.runs.values()
        assert [row["step"] for row in state.val] == [3, 6, 9]   # the replayed training chart
        np.testing.assert_array_equal(state.scalars.since(0)[0]["step"], np.arange(1, 10))
    finally:
        hub.stop()


@pytest.mark.parametrize("first_watched", [True, False])
def test_a_resumed_fit_says_which_run_it_continues(tmp_path, caplog, first_watched):
    """Resumed from a checkpoint into the default run directory, a fit is a new run (``revacnn-2``); it said
    nothing of the run it continues. It now does: in the log, in its heartbeat (kept by the recording), and in the
    dashboard's run summary. A checkpoint saved without the callback has no run to name."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from revacnn_dash.views.header import resumed_text
    from revacnn_dash.data.hub import Hub

    def fit_digits(max_steps, *callbacks, ckpt_path=None):
        trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=list(callbacks),
                                default_root_dir=tmp_path, enable_checkpointing=True)
        trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)

    first = ReVACNNCallback()
    checkpoints = ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=4, save_top_k=-1)
    fit_digits(6, checkpoints, *([first] if first_watched else []))
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"
    second = ReVACNNCallback()
    with caplog.at_level(logging.INFO):
        fit_digits(8, second, ckpt_path=checkpoint)
    earlier = first.run_id if first_watched else None
    assert second.run_id != first.run_id and second.run_dir.name == ("revacnn-2" if first_watched else "revacnn")
    said = f"continues run {earlier}" if first_watched else "continues a checkpoint saved without this callback"
    assert f"revacnn: run {second.run_id} {said} from step 4 ({checkpoint})" in caplog.text
    run = open_run(second.run_dir)
    np.testing.assert_array_equal(run.scalars()["step"], [5, 6, 7, 8])
    assert run.status()["resumed"] == {"run": earlier, "step": 4, "checkpoint": str(checkpoint)}
    hub = Hub([], logdir=str(second.run_dir), warm_umap=False)
    try:
        hub.scan_logdir()
        (state,) = hub.runs.values()
        shown = resumed_text(state.summary()["resumed"])
    finally:
        hub.stop()
    assert shown == (f"continues run {earlier} from step 4" if first_watched else "continues a checkpoint from step 4")
