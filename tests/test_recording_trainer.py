"""The recording of real Trainer runs: what the reader returns equals independently computed values, filter ids
survive steering, and a trainer killed with SIGKILL leaves a readable run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback
from revacnn.wire.client import RunClient
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.recording.reader import list_runs, open_run
from helpers import quiet_trainer, wait_for
from test_callback_telemetry import Witness


class Steer(pl.Callback):
    """Sends a widen command to the run's own control socket at step 8, as a dashboard would."""

    def __init__(self, callback: ReVACNNCallback) -> None:
        self.callback = callback
        self.client: RunClient | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 8:
            self.client = RunClient(self.callback.connection_file)
            self.client.connect()
            self.client.send_command("widen", {"layer": "net.conv2", "count": 2})
            self.client.send_command("remove_filters", {"layer": "net.conv2", "filters": [0, 5]})

    def on_train_end(self, trainer, pl_module):
        if self.client is not None:
            self.client.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded")
    torch.manual_seed(1)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    witness = Witness(data)
    callback = ReVACNNCallback(filters_every=1, snapshot_every=10)
    steer = Steer(callback)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=10, callbacks=[callback, witness, steer],
                            default_root_dir=root, num_sanity_val_steps=0, logger=True)
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.05), data)
    return {"root": root, "callback": callback, "witness": witness, "run": open_run(callback.run_dir)}


def test_the_run_is_found_in_the_trainers_log_dir(recorded):
    runs = list_runs(recorded["root"])
    assert len(runs) == 1
    assert str(recorded["callback"].run_dir) in str(runs[0]["path"] if isinstance(runs[0], dict) else runs[0].path)


def test_scalars_equal_the_independently_computed_losses(recorded):
    scalars = recorded["run"].scalars()
    np.testing.assert_array_equal(scalars["step"], np.arange(1, 21))
    expected = np.array([recorded["witness"].losses[step] for step in range(1, 21)])
    np.testing.assert_allclose(scalars["loss"], expected, rtol=1e-5)


def test_per_filter_series_equal_independent_gradients_before_steering(recorded):
    run = recorded["run"]
    series = run.filter_series("net.conv1", "grad_sq_mean", start=1, stop=8)
    np.testing.assert_array_equal(series["step"], np.arange(1, 8))
    for row, step in enumerate(range(1, 8)):
        grad = recorded["witness"].pre_step[step]["net.conv1"][1]
        expected = (grad.reshape(16, -1).astype(np.float64) ** 2).mean(1)
        np.testing.assert_allclose(series["values"][row], expected, rtol=2e-4)


def test_filter_ids_stay_consistent_across_widen_and_remove(recorded):
    run = recorded["run"]
    structures = [body for _, body in run.structures()]
    conv2 = [next(layer for layer in body["layers"] if layer["name"] == "net.conv2") for body in structures]
    before, after = conv2[0]["filter_ids"], conv2[-1]["filter_ids"]
    assert len(before) == 20 and len(after) == 20  # +2 then −2
    removed = {before[0], before[5]}
    assert set(after[:18]) == set(before) - removed
    assert len(set(after[18:]) & set(before)) == 0, "new filters get new ids"
    series = run.filter_series("net.conv2", "weight_norm")
    ids = list(series["filter_ids"])
    steps = series["step"]
    late = steps > 9
    for filter_id in removed:  # a removed filter stops having values
        column = series["values"][:, ids.index(filter_id)]
        assert np.isnan(column[late]).all() and np.isfinite(column[steps <= 8]).all()
    kept = after[3]
    column = series["values"][:, ids.index(kept)]
    assert np.isfinite(column).all()
    # the kept filter's norm is continuous: Net2Net copies sources and splits only the consumer
    witness_norm = np.linalg.norm(recorded["witness"].pre_step[12]["net.conv2"][0][3].ravel())
    assert column[list(steps).index(12)] == pytest.approx(witness_norm, rel=1e-4)


def test_steering_log_records_both_commands(recorded):
    log = [entry for entry in recorded["run"].steering_log() if entry.get("status") in ("done", "error")]
    assert [(entry["op"], entry["status"]) for entry in log] == [("widen", "done"), ("remove_filters", "done")]


def test_snapshots_and_validation_are_recorded(recorded):
    run = recorded["run"]
    assert run.snapshot_steps() == [1, 10, 20]
    snapshot = run.snapshot(10)
    assert snapshot["arrays"]["weight/net.conv2"].shape == (20, 16, 5, 5)
    val = run.val_predictions()
    np.testing.assert_array_equal(val["steps"], [10, 20])
    np.testing.assert_array_equal(val["pred"][-1], recorded["witness"].predictions[20])


def test_sigkill_of_a_real_trainer_leaves_a_readable_recording(tmp_path):
    for attempt in range(2):
        root = tmp_path / f"kill{attempt}"
        process = subprocess.Popen([sys.executable, "-m", "revacnn.demo.train_digits", "--epochs", "50",
                                    "--slow", "0.01", "--root", str(root), "--filters-every", "1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            found = wait_for(lambda: list(root.glob("lightning_logs/version_*/revacnn/connection.json")), timeout=120,
                             interval=0.1)
            with RunClient(found[0]) as client:
                client.connect(timeout=30)
                seen_at: dict[int, float] = {}
                # read until steps flow (a loaded machine can take many seconds to start training), then on for a
                # while so that some steps were seen over a second before the kill
                stop_after, give_up = None, time.monotonic() + 120
                while time.monotonic() < (stop_after or give_up):
                    message = client.recv(0.1)
                    if message is not None and message.type == "step":
                        seen_at[message.body["step"]] = time.monotonic()
                        if stop_after is None and len(seen_at) >= 3:
                            stop_after = time.monotonic() + 1.5 + attempt * 1.7
            killed_at = time.monotonic()
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
        run = open_run(found[0].parent)
        steps = run.scalars()["step"]
        must_have = max(step for step, at in seen_at.items() if at <= killed_at - 1.0)
        assert steps.max() >= must_have
        np.testing.assert_array_equal(steps, np.arange(1, steps.max() + 1))
        series = run.filter_series("net.conv1", "grad_abs_mean")
        assert np.isfinite(series["values"]).all()


def test_recording_failure_stops_training_cleanly_when_asked(tmp_path):
    import shutil

    callback = ReVACNNCallback(filters_every=1, snapshot_every=0, on_recording_error="stop")

    class RemoveRecordingAtStep5(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                shutil.rmtree(callback.run_dir)
            time.sleep(0.02)  # let the writer thread notice between batches

    trainer = quiet_trainer(max_epochs=20, limit_train_batches=20, limit_val_batches=0,
                            callbacks=[callback, RemoveRecordingAtStep5()], default_root_dir=tmp_path)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule())
    assert callback.recorder.error
    assert 5 < trainer.global_step < 400, "fit ended early, once the failure was seen"
    assert callback._state == "stopped"


class RaisesAtStep(ClassifierModule):
    """Raises ``exception`` in the training step of step ``at`` (``at`` steps completed before it)."""

    def __init__(self, exception: BaseException, at: int) -> None:
        super().__init__(ReVACNNNet(), lr=0.05)
        self.exception, self.at = exception, at

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.at:
            raise self.exception
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("exception, state", [(RuntimeError("boom in training_step"), "failed"),
                                              (KeyboardInterrupt(), "stopped")])
def test_a_run_that_raises_or_is_interrupted_is_recorded_to_its_last_step_and_closed(tmp_path, exception, state):
    """Lightning calls no callback ``teardown`` after an exception or a Ctrl-C, only ``on_exception``: the callback
    must close there, or the last steps, the final state and the closing of the recording are lost."""
    callback = ReVACNNCallback()
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback], default_root_dir=tmp_path, num_sanity_val_steps=0,
                            limit_val_batches=0, logger=True)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit if isinstance(exception, KeyboardInterrupt) else RuntimeError):
            trainer.fit(RaisesAtStep(exception, at=12), DigitsDataModule(batch_size=32))
    finally:
        signal.signal(signal.SIGINT, sigint)   # Lightning ignores SIGINT from a Ctrl-C on (it then exits)
    run = open_run(callback.run_dir)
    summary = run.summary()
    assert summary["closed"] is not None and summary["state"] == state, summary
    assert run.status()["message"] == ("interrupted (KeyboardInterrupt)" if state == "stopped"
                                       else "RuntimeError: boom in training_step")
    assert run.scalars()["step"].tolist() == list(range(1, 13))     # every completed step, the 12th included
    assert not callback.publisher and not callback.recorder._thread.is_alive()
