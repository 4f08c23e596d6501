"""What the dashboard shows of a run's past: the steps before it connected (filled from the recording, no gap or
duplicate at the seam), the structure a replayed step had, and what a command's ack says it changed (issue 28,
correctness 2, 3 and 6). Real Lightning trainers, a real wire, real recordings."""

from __future__ import annotations

import time

import numpy as np
import pytorch_lightning as pl

from helpers import quiet_trainer, wait_for


class SlowSteps(pl.Callback):
    """Paces the steps (the dashboard joins a run in progress) and, at ``connect_at``, adds the run to a hub."""

    def __init__(self, callback, hub, connect_at: int, pace_s: float = 0.02) -> None:
        self.callback, self.hub, self.connect_at, self.pace_s = callback, hub, connect_at, pace_s
        self.state = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.pace_s)      # paces the loop: the dashboard connects while the run goes on
        if trainer.global_step == self.connect_at:
            self.state = self.hub.add_live(str(self.callback.connection_file))
            wait_for(lambda: self.state.conn == "live", timeout=20, interval=0.05)


def test_a_dashboard_connecting_mid_run_charts_every_step_from_the_first(tmp_path):
    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
    from revacnn.recording.reader import open_run
    from revacnn_dash.data.hub import Hub

    hub = Hub([], warm_umap=False)
    callback = ReVACNNCallback(snapshot_every=0, filters_every=5)
    pacer = SlowSteps(callback, hub, connect_at=40)
    trainer = quiet_trainer(max_steps=90, limit_val_batches=2, val_check_interval=30, check_val_every_n_epoch=None,
                            callbacks=[callback, pacer], default_root_dir=tmp_path)
    try:
        trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=32))
        state = pacer.state
        recorded = open_run(callback.run_dir).scalars()
        assert list(recorded["step"]) == list(range(1, 91))
        wait_for(lambda: state.scalars_since(0)[0]["step"].tolist() == list(range(1, 91)), timeout=20)
        cols = state.scalars_since(0)[0]
        np.testing.assert_array_equal(cols["loss"], recorded["loss"])       # the recorded and the wire's values
        np.testing.assert_array_equal(cols["lr"], recorded["lr/0"])
        assert state.first_live_step is not None and state.first_live_step > 1   # the seam was there to fill
        assert state.history_revision >= 1
        assert [v["step"] for v in state.val_history()] == [30, 60, 90]      # validations before it too
        assert state.recording_path == str(callback.run_dir)
    finally:
        hub.stop()


class WidenAt(pl.Callback):
    """Widens ``net.conv2`` by one over the run's control socket at ``step`` and keeps its final ack."""

    def __init__(self, callback, step: int) -> None:
        self.callback, self.step = callback, step
        self.client = None
        self.ack = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from revacnn.wire.client import RunClient

        if trainer.global_step == self.step:
            self.client = RunClient(self.callback.connection_file)
            self.client.connect()
            self.client.send_command("widen", {"layer": "net.conv2", "count": 1})
        self.read_acks()

    def read_acks(self):
        message = self.client.recv(0.01) if self.client is not None else None
        while message is not None and self.ack is None:
            if message.type == "ack" and message.body["status"] in ("done", "error"):
                self.ack = message.body
            message = self.client.recv(0.01)
        return self.ack

    def on_train_end(self, trainer, pl_module):
        wait_for(self.read_acks, timeout=10)
        self.client.close()


def test_a_replayed_step_shows_the_structure_it_had(tmp_path):
    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
    from revacnn.recording.reader import open_run
    from revacnn_dash.data.hub import Hub
    from revacnn_dash.data.replay import load_replay

    callback = ReVACNNCallback(snapshot_every=5, filters_every=5)
    widen = WidenAt(callback, step=12)
    trainer = quiet_trainer(max_steps=25, limit_val_batches=0, callbacks=[callback, widen], default_root_dir=tmp_path)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=32))
    assert widen.ack["status"] == "done", widen.ack
    applied = widen.ack["step"]
    run = open_run(callback.run_dir)
    widths = [(step, {l["name"]: l["out"] for l in body["layers"]}["net.conv2"]) for step, body in run.structures()]
    # the structure's step is the last step recorded before it: the widened one is in force after the command's step
    assert widths == [(0, 20), (applied, 21)], widths
    hub = Hub([], logdir=str(tmp_path), warm_umap=False)
    try:
        hub.scan_logdir()
        (key,) = hub.runs
        state, reader = hub.runs[key], hub.replays[key]
        steps = reader.snapshot_steps()
        before = [s for s in steps if s < applied]
        after = [s for s in steps if s > applied]
        assert before and after, steps
        for step, conv2 in ((before[0], 20), (after[-1], 21), (before[-1], 20)):
            load_replay(state, reader, step=step)
            outs = {l["name"]: l["out"] for l in state.structure["layers"]}
            assert outs["net.conv2"] == conv2, (step, outs)
            ids = [l for l in state.structure["layers"] if l["name"] == "net.conv2"][0]["filter_ids"]
            assert len(ids) == conv2
            # the snapshot drawn with it has as many filters
            assert np.asarray(state.snapshot.arrays["weight/net.conv2"]).shape[0] == conv2
    finally:
        hub.stop()


def test_a_done_ack_says_what_changed_and_a_queued_batch_size_when_it_applies():
    from revacnn_dash.viewmodels.acks import ack_detail

    structure = {"layers": [{"name": "net.conv2", "out": 22, "filter_ids": [*range(16, 36), 66, 67]}]}
    widen = {"op": "widen", "status": "done", "error": None, "note": "", "args": {"layer": "net.conv2", "count": 2},
             "result": {"changes": {"layer": "net.conv2", "group": ["net.conv2"], "channels": [20, 22]}}}
    assert ack_detail(widen, structure) == "net.conv2: 20 → 22 filters; added indices 20, 21 (ids 66, 67)"
    # before the structure with the new width arrived, no ids are named
    assert ack_detail(widen, {"layers": []}) == "net.conv2: 20 → 22 filters; added indices 20, 21"
    # a grouped conv's new filters sit at the end of each of its groups (``changes.added_at``): their ids there
    grouped = {"layers": [{"name": "net.conv2", "out": 24, "filter_ids": [*range(10), 66, 67, *range(10, 20), 68, 69]}]}
    widen["result"]["changes"].update(channels=[20, 24], added_at=[10, 11, 22, 23])
    assert ack_detail(widen, grouped) == "net.conv2: 20 → 24 filters; added indices 10, 11, 22, 23 (ids 66, 67, 68, 69)"
    lr = {"op": "set_hparams", "status": "done", "error": None, "note": "",
          "result": {"changes": {"groups": [{"optimizer": 0, "group": 0, "lr": [0.02, 0.005]},
                                            {"optimizer": 0, "group": 1, "lr": [0.02, 0.005]}]}}}
    assert ack_detail(lr) == "lr 0.02 → 0.005"
    batch = {"op": "set_batch_size", "status": "queued", "error": None, "note": "", "result": {}}
    assert ack_detail(batch) == "takes effect at the next epoch"
    assert ack_detail({**batch, "status": "done", "result": {"batch_size": 48, "epoch": 3}}) == \
        "batch size 48 from epoch 3"
    refused = {**batch, "status": "error", "error": "set_batch_size: superseded by command x before it took effect"}
    assert ack_detail(refused) == refused["error"]


def test_a_worker_on_a_log_folder_switches_to_a_newer_run(tmp_path):
    import os

    from revacnn_dash.data.state import RunState
    from revacnn_dash.data.worker import RunWorker

    first = tmp_path / "lightning_logs" / "version_0" / "revacnn"
    first.mkdir(parents=True)
    (first / "connection.json").write_text("{}")
    worker = RunWorker(RunState(str(tmp_path / "lightning_logs")))
    worker.connected_to = str(first / "connection.json")
    assert worker.newer_run() is None
    second = tmp_path / "lightning_logs" / "version_1" / "revacnn"
    second.mkdir(parents=True)
    (second / "connection.json").write_text("{}")
    os.utime(second / "connection.json", (time.time() + 5, time.time() + 5))
    assert worker.newer_run() == str(second / "connection.json")
    # a run directory or a connection file given as the target is that run: nothing newer is looked for
    assert RunWorker(RunState(str(first))).newer_run() is None


def test_a_recorded_ack_without_args_is_labelled_from_its_result():
    from revacnn_dash.data.command_log import Event

    lr = Event("a", "set_hparams", {}, result={"changes": {"groups": [{"optimizer": 0, "group": 0,
                                                                       "lr": [0.02, 0.01]}]}})
    assert lr.label() == "set lr=0.01"
    assert Event("b", "set_batch_size", {}, result={"batch_size": 48, "epoch": 2}).label() == "batch_size=48"
    widen = Event("c", "widen", {}, result={"changes": {"layer": "net.conv2", "channels": [20, 22]}})
    assert widen.label() == "widen net.conv2 +2"


def test_the_analysis_menus_move_to_the_watched_runs_recording_once_each(tmp_path):
    from dash import no_update

    from revacnn_dash.data.state import RunState
    from revacnn_dash.views.watched_run import follow_watched_run

    class OneRun:
        def __init__(self, state):
            self.state = state

        def get(self, key):
            return self.state if key == self.state.key else None

    state = RunState(str(tmp_path / "lightning_logs"))
    state.recording_path = str(tmp_path / "lightning_logs" / "version_1" / "revacnn")
    hub = OneRun(state)
    old = [{"label": "version_0/a", "value": str(tmp_path / "lightning_logs" / "version_0" / "revacnn")}]
    both = old + [{"label": "version_1/b", "value": state.recording_path}]
    # the explorer lists the watched run's recording, the comparison not yet: only the explorer moves
    *values, applied = follow_watched_run(hub, state.key, "explore", both, old, old, None)
    assert values == [state.recording_path, no_update, no_update]
    # the comparison's menus list it later: they move then, the explorer (chosen already) is left as the user set it
    *values, applied = follow_watched_run(hub, state.key, "compare", both, both, both, applied)
    assert values == [no_update, state.recording_path, state.recording_path]
    *values, again = follow_watched_run(hub, state.key, "compare", both, both, both, applied)
    assert values == [no_update] * 3 and again is no_update
