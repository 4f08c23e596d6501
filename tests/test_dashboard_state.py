"""RunState and the dashboard's I/O thread against a real Publisher on loopback (no torch)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from revacnn.wire.connection import ConnectionInfo
from revacnn.wire.protocol import Message
from revacnn.wire.publisher import Publisher
from revacnn_dash.data.scalars import metric_name
from revacnn_dash.data.state import FINISHED, LIVE, UNREACHABLE, RunState
from revacnn_dash.data.worker import RunWorker, resolve_target

from helpers import quiet_trainer, wait_for

STRUCTURE = {"revision": 0, "model": "M", "layers": [
    {"name": "net.conv1", "type": "Conv2d", "kind": "conv", "in": 3, "out": 4, "frozen": None,
     "filter_ids": [0, 1, 2, 3]},
    {"name": "net.conv2", "type": "Conv2d", "kind": "conv", "in": 4, "out": 2, "frozen": "all",
     "filter_ids": [4, 5]}], "layer_edges": [["input", "net.conv1"], ["net.conv1", "net.conv2"]]}


def step_message(step: int, loss: float | None, per_filter: bool = False) -> Message:
    """A ``step`` message as the callback sends it: a NaN or infinite ``loss`` goes as nil, named in ``not_finite``."""
    body = {"step": step, "epoch": 0, "batch": step, "loss": loss, "metrics": {"train_acc": 0.5},
            "groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}], "batch_size": 32, "samples_per_s": 100.0,
            "per_filter": per_filter}
    if loss is not None and not np.isfinite(loss):
        body.update(loss=None, not_finite=["loss"])
    arrays = {}
    if per_filter:
        body["layer_names"] = ["net.conv1", "net.conv2"]
        body["filter_fields"] = ["grad_abs_mean", "grad_sq_mean", "weight_norm", "update_ratio", "act_abs_mean"]
        arrays["filters"] = np.arange(30, dtype=np.float32).reshape(5, 6)
        arrays["layers"] = np.array([0.5, 0.25], dtype=np.float32)
    return Message("step", body, arrays)


# -- RunState alone -----------------------------------------------------------------------------------------------

def test_ring_keeps_the_last_rows_and_reports_a_wrapped_cursor():
    state = RunState("x", scalar_capacity=5)
    for i in range(12):
        state.apply(step_message(i, float(i)))
    cols, start, total = state.scalars_since(0)
    assert total == 12 and start == 7          # the browser asked for row 0, but only rows 7..11 are kept
    assert cols["step"].tolist() == [7, 8, 9, 10, 11]
    cols, start, total = state.scalars_since(10)
    assert start == 10 and cols["loss"].tolist() == [10.0, 11.0]
    assert cols["lr"].tolist() == [0.1, 0.1] and cols["train_acc"].tolist() == [0.5, 0.5]


@pytest.mark.parametrize(("names", "kind", "stage", "expected"), [
    (["train_loss", "val_loss", "l1"], "loss", "train", "train_loss"),
    (["g_loss", "d_loss"], "loss", "train", "d_loss"),                       # GAN: the shorter, then by name
    (["train_acc_epoch", "train_acc_step"], "acc", "train", "train_acc_step"),
    (["accuracy", "loss"], "acc", "train", "accuracy"),
    (["valid/accuracy", "val_loss", "train_acc"], "acc", "val", "valid/accuracy"),
    (["test_acc", "val_acc"], "acc", "train", None),                          # another stage's only
    (["lr/0", "batch_size", "accumulate"], "acc", "train", None),             # "acc" as a word, not a prefix
])
def test_which_logged_metric_is_the_loss_or_the_accuracy(names, kind, stage, expected):
    assert metric_name(names, kind, stage) == expected


def test_charts_take_the_loss_and_accuracy_the_module_logged_under_its_own_names():
    """The charts knew only ``train_acc``/``acc`` and ``val_loss``/``val_acc``, and a step that returned no loss
    (manual optimization) drew no loss at all."""
    state = RunState("x")
    row = {"step": 1, "loss": None, "metrics": {"train/loss": 2.5, "train/accuracy": 0.25}, "groups": [{"lr": 0.1}]}
    state.apply(Message("steps", {"first": 1, "last": 1, "rows": [row]}))
    state.apply(Message("val", {"step": 1, "epoch": 0, "count": 0, "metrics": {"valid/loss": 2.0, "valid/acc": 0.5}}))
    cols, _, _ = state.scalars_since(0)
    assert cols["loss"].tolist() == [2.5] and cols["train_acc"].tolist() == [0.25]
    assert (state.val[-1]["val_loss"], state.val[-1]["val_acc"]) == (2.0, 0.5)


def test_a_step_already_charted_is_not_charted_again_but_its_filters_are_kept():
    """A state snapshot re-sent on reconnecting to the same run repeats the latest steps: the loss chart must stay
    one point per step, in step order."""
    state = RunState("x")
    state.apply(Message("structure", STRUCTURE))
    for step in (10, 11, 12):
        state.apply(step_message(step, float(step), per_filter=step == 10))
    state.apply(step_message(10, 10.0, per_filter=True))   # snapshot again: step_filters, then step
    state.apply(step_message(12, 12.0))
    state.apply(step_message(13, 13.0))
    cols, _, _ = state.scalars_since(0)
    assert cols["step"].tolist() == [10, 11, 12, 13]
    assert state.filters_by_layer()["net.conv1"]["grad_abs_mean"].tolist() == [0, 1, 2, 3]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("losses,since", [
    ([2.3, 2.1, NAN, NAN, NAN, NAN], 3),            # diverged at step 3
    ([NAN, INF, NAN, NAN], 1),                      # from the first step on
    ([2.3, NAN, None, NAN, NAN], 2),                # a step without a loss neither ends nor starts a streak
    ([2.3, NAN, NAN, NAN, 2.0, 1.9], None),         # it came back: the banner goes
    ([2.3, NAN, NAN, 2.0, NAN, NAN], None),         # never three in a row
    ([2.3, None, None, None, None, None], None),    # a module that stopped returning its loss did not diverge
    ([None, None, None, None, None, None], None),   # a module that never returns a loss (nothing to chart)
])
def test_the_banner_says_since_when_a_run_has_no_finite_loss(losses, since):
    """A diverged run's loss chart just stopped: nothing said the loss had become NaN."""
    from revacnn_dash.views.header import banner_children

    state = RunState("x")
    for step, loss in enumerate(losses, start=1):
        state.apply(step_message(step, loss))
    summary = state.summary()
    assert summary["loss_not_finite_since"] == since
    warning = [child for child in banner_children(summary) if getattr(child, "id", None) == "loss-not-finite"]
    assert [w.children for w in warning] == ([] if since is None else
                                             [f"⚠ loss is NaN or ±inf since step {since} (diverged?)"])


def test_a_replayed_diverged_run_says_since_when_it_has_no_finite_loss(tmp_path):
    
    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
    from revacnn_dash.data.hub import Hub

    callback = ReVACNNCallback(snapshot_every=0)
    trainer = quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=1e4), DigitsDataModule(batch_size=32))   # diverges at once
    hub = Hub([], logdir=str(tmp_path), warm_umap=False)
    try:
        hub.scan_logdir()
        (state,) = hub.runs.values()
        losses = state.scalars_since(0)[0]["loss"]
    finally:
        hub.stop()
    first_bad = int(np.flatnonzero(~np.isfinite(losses))[0]) + 1
    assert np.isfinite(losses[:first_bad - 1]).all() and not np.isfinite(losses[first_bad - 1:]).any()
    assert state.summary()["loss_not_finite_since"] == first_bad


def test_filters_are_split_per_layer_and_checked_against_the_structure():
    state = RunState("x")
    state.apply(Message("structure", STRUCTURE))
    state.apply(step_message(10, 1.0, per_filter=True))
    by_layer = state.filters_by_layer()
    assert by_layer["net.conv1"]["grad_abs_mean"].tolist() == [0, 1, 2, 3]
    assert by_layer["net.conv2"]["act_abs_mean"].tolist() == [28, 29]     # row 4, columns 4..5
    assert state.layer_ratio == {"net.conv1": 0.5, "net.conv2": 0.25}
    widened = {**STRUCTURE, "revision": 1, "layers": [dict(STRUCTURE["layers"][0], out=5), STRUCTURE["layers"][1]]}
    state.apply(Message("structure", widened))
    assert state.filters_by_layer() == {}     # the per-filter message predates the widen: not misattributed


def test_events_follow_acks_and_ignore_a_late_queued():
    state = RunState("x")
    state.conn = LIVE
    cid = state.submit("widen", {"layer": "net.conv2", "count": 1})
    assert [e.id for e in state.take_outbox()] == [cid]
    assert state.event_list()[0]["status"] == "pending"
    state.apply(Message("ack", {"id": cid, "op": "widen", "status": "done", "step": 7, "error": None}))
    state.apply(Message("ack", {"id": cid, "op": "widen", "status": "queued", "step": None, "error": None}))
    event = state.event_list()[0]
    assert (event["status"], event["step"], event["label"]) == ("done", 7, "widen net.conv2 +1")


def test_a_command_for_an_unreachable_run_is_an_error_at_once():
    state = RunState("x")
    state.set_connection(UNREACHABLE, "no heartbeat")
    state.submit("pause", {})
    event = state.event_list()[0]
    assert event["status"] == "error" and "unreachable" in event["error"]
    assert state.take_outbox() == []


def test_resolve_target_finds_the_newest_connection_file(tmp_path):
    old = tmp_path / "lightning_logs" / "version_0" / "revacnn"
    new = tmp_path / "lightning_logs" / "version_1" / "revacnn"
    for i, d in enumerate((old, new)):
        d.mkdir(parents=True)
        ConnectionInfo(protocol=1, run_id=f"r{i}", telemetry="tcp://127.0.0.1:1", control="tcp://127.0.0.1:2"
                       ).write(d / "connection.json")
        time.sleep(0.02)  # the newer file gets a later modification time, which is what "newest" reads
    assert resolve_target(str(tmp_path)) == str(new / "connection.json")
    assert resolve_target(str(old)) == str(old / "connection.json")
    assert resolve_target("tcp://127.0.0.1:5") == "tcp://127.0.0.1:5"


# -- the I/O thread against a real Publisher ----------------------------------------------------------------------

@pytest.fixture
def publisher():
    pub = Publisher("run-a", heartbeat_s=0.2).start()
    pub.set_status(state="running", step=0)
    pub.publish(Message("structure", STRUCTURE))
    assert wait_for(lambda: pub.queue_length == 0)
    yield pub
    pub.close(timeout=1)


def test_worker_drains_telemetry_and_round_trips_a_command(publisher):
    state = RunState(publisher.control_endpoint)
    worker = RunWorker(state, silence_s=2.0)
    worker.start()
    try:
        assert wait_for(lambda: state.conn == LIVE and state.structure is not None), state.conn_message
        assert state.run_id == "run-a"
        for i in range(1, 21):
            publisher.publish(step_message(i, 1.0 / i, per_filter=(i % 10 == 0)))
            time.sleep(0.005)  # paces the steps as a trainer does, rather than all in one send
        assert wait_for(lambda: state.scalars.total >= 20)
        cols, _, _ = state.scalars_since(0)
        assert cols["step"][-1] == 20 and cols["loss"][-1] == pytest.approx(0.05)
        assert state.latest_filters()[0] == 20
        cid = state.submit("set_hparams", {"lr": -1.0})
        assert wait_for(lambda: any(c["id"] == cid for c in publisher._commands), timeout=5)
        command = [c for c in publisher.poll_commands() if c["id"] == cid][0]
        assert command["op"] == "set_hparams" and command["args"] == {"lr": -1.0}
        assert wait_for(lambda: state.events[cid].status == "queued")
        publisher.send_ack(command, "error", step=20, error="set_hparams: field 'lr' must be >= 0.0, got -1.0")
        assert wait_for(lambda: state.events[cid].status == "error")
        assert state.events[cid].error.startswith("set_hparams: field 'lr' must be >= 0.0")
    finally:
        worker.stop()


def test_worker_reports_finished_then_unreachable_and_reconnects_to_a_restarted_trainer():
    first = Publisher("run-1", heartbeat_s=0.2).start()
    control_port = int(first.control_endpoint.rsplit(":", 1)[1])
    telemetry_port = int(first.telemetry_endpoint.rsplit(":", 1)[1])
    first.set_status(state="running")
    state = RunState(first.control_endpoint)
    worker = RunWorker(state, silence_s=1.0, connect_timeout=1.0, retry_s=0.2)
    worker.start()
    second = None
    try:
        assert wait_for(lambda: state.conn == LIVE)
        first.publish(step_message(1, 2.0))
        assert wait_for(lambda: state.scalars.total == 1)
        first.set_status(state="finished", step=1)
        assert wait_for(lambda: state.conn == FINISHED), state.conn_message
        first.close(timeout=1)
        assert wait_for(lambda: "exited" in state.conn_message, timeout=6), state.conn_message
        generation = state.generation
        second = Publisher("run-2", heartbeat_s=0.2, control_port=control_port,
                           telemetry_port=telemetry_port).start()
        second.set_status(state="running")
        assert wait_for(lambda: state.conn == LIVE and state.run_id == "run-2", timeout=8), state.conn_message
        assert state.generation == generation + 1 and state.scalars.total == 0   # a new run's history
        second.publish(step_message(1, 3.0))
        assert wait_for(lambda: state.scalars.total == 1)
        assert any("trainer restarted" in text for _, text in state.log)
    finally:
        worker.stop()
        first.close(timeout=1)
        if second is not None:
            second.close(timeout=1)


def test_unreachable_target_is_reported_with_the_reason(tmp_path):
    state = RunState("tcp://127.0.0.1:9")     # nothing listens on the discard port
    worker = RunWorker(state, connect_timeout=0.3, retry_s=0.1)
    worker.start()
    try:
        assert wait_for(lambda: state.conn == UNREACHABLE, timeout=5)
        assert "cannot reach tcp://127.0.0.1:9" in state.conn_message
    finally:
        worker.stop()


def test_dashboard_never_imports_torch():
    code = ("import sys, revacnn_dash.app, revacnn_dash.cli, revacnn_dash.data.hub, revacnn_dash.data.worker; "
            "bad = [m for m in ('torch', 'pytorch_lightning', 'lightning') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_requires_a_token_beyond_loopback(monkeypatch):
    # The refusal of non-loopback hosts gave way to token authentication (tests/test_dashboard_auth.py).
    from revacnn_dash.cli import parse_args
    monkeypatch.delenv("REVACNN_DASH_TOKEN", raising=False)
    assert parse_args(["--connect", "tcp://127.0.0.1:1", "--host", "0.0.0.0"]).auth_token
    assert parse_args(["--connect", "x", "--host", "::1"]).host == "::1"
    assert parse_args(["--connect", "x"]).host == "127.0.0.1" and parse_args(["--connect", "x"]).port == 8050


def test_cli_serves_the_page_on_loopback_and_prints_the_url(tmp_path):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "revacnn_dash.cli", "--connect", "tcp://127.0.0.1:9",
                             "--port", str(port), "--no-umap-warmup"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"revacnn-dash: serving on http://127.0.0.1:{port}/"), line

        def page() -> str:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
            except OSError:
                return ""

        body = wait_for(page, timeout=20, interval=0.2)
        assert "<title>revacnn</title>" in body
        layout = urllib.request.urlopen(f"http://127.0.0.1:{port}/_dash-layout", timeout=5).read().decode()
        assert "net-graph" in layout and "train-graph" in layout and "emb-graph" in layout
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_server_of_another_protocol_version_is_reported_as_incompatible():
    import threading

    import zmq

    from revacnn.wire.protocol import Codec
    from revacnn_dash.data.state import INCOMPATIBLE

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        codec = Codec("future-run")
        while not stop.is_set():
            if router.poll(50):
                identity, *frames = router.recv_multipart()
                request = codec.decode(frames)
                router.send_multipart([identity] + codec.encode(Message("error", {
                    "req": request.body["req"], "error": "unsupported_version",
                    "detail": "this server speaks protocol versions [2]; the client offered [1]"})))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    state = RunState(f"tcp://127.0.0.1:{port}")
    worker = RunWorker(state, connect_timeout=1.0, retry_s=0.2)
    worker.start()
    try:
        assert wait_for(lambda: state.conn == INCOMPATIBLE, timeout=5), state.conn_message
        assert "versions [2]" in state.conn_message and "protocol 1" in state.conn_message
    finally:
        worker.stop()
        stop.set()
        thread.join(2)
        router.close()
        context.term()


def test_hub_shows_several_live_runs():
    from revacnn_dash.data.hub import Hub

    a = Publisher("run-a", heartbeat_s=0.2).start()
    b = Publisher("run-b", heartbeat_s=0.2).start()
    for p in (a, b):
        p.set_status(state="running")
    hub = Hub([a.control_endpoint, b.control_endpoint], warm_umap=False)
    try:
        assert wait_for(lambda: all(s.conn == LIVE for s in hub.runs.values()), timeout=10)
        labels = [o["label"] for o in hub.options()]
        assert labels == ["● live: run-a (live)", "● live: run-b (live)"]
        cid = hub.runs[hub.options()[1]["value"]].submit("pause", {})
        assert wait_for(lambda: any(c["id"] == cid for c in b._commands), timeout=5)
        assert not any(c["id"] == cid for c in a._commands)
    finally:
        hub.stop()
        a.close(timeout=1)
        b.close(timeout=1)


def training_chart(state: RunState, smoothing: float = 0.0):
    """A hub showing ``state`` and a function that makes the page's training-chart request with a cursor,
    returning the figure (or Patch) and the new cursor."""
    from revacnn_dash.app import create_app
    from revacnn_dash.data.hub import Hub

    hub = Hub([], warm_umap=False)
    hub.runs[state.key] = state
    client = create_app(hub).server.test_client()
    dep = next(d for d in client.get("/_dash-dependencies").get_json()
               if d["output"].startswith("..train-graph.figure"))
    outputs = [{"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
               for part in dep["output"].strip(".").split("...")]

    def tick(cursor):
        response = client.post("/_dash-update-component", json={
            "output": dep["output"], "outputs": outputs, "changedPropIds": ["tick-training.data"],
            "inputs": [{"id": "tick-training", "property": "data", "value": [1, 0]},
                       {"id": "run-select", "property": "value", "value": state.key},
                       {"id": "train-log", "property": "value", "value": []},
                       {"id": "train-smooth", "property": "value", "value": smoothing}],
            "state": [{"id": "train-cursor", "property": "data", "value": cursor},
                      {"id": "tabs", "property": "value", "value": "training"}]})
        assert response.status_code == 200, response.data[:300]
        body = response.get_json()["response"]
        return body["train-graph"]["figure"], body["train-cursor"]["data"]

    return hub, tick


def test_the_training_chart_extends_and_is_redrawn_from_the_ring_once_the_page_holds_one_and_a_half_rings():
    state = RunState("chart", scalar_capacity=100)
    hub, tick = training_chart(state)

    def append(first, last):
        for step in range(first, last + 1):
            state.apply(step_message(step, loss=1.0 / step))

    append(1, 100)
    figure, cursor = tick(None)                         # a full figure: the ring's 100 steps
    assert figure["data"][0]["x"] == list(range(1, 101)) and cursor["first"] == 0 and cursor["count"] == 100
    append(101, 140)
    patch, cursor = tick(cursor)                        # a Patch: 40 new points travel, the page holds 140
    assert "operations" in patch and cursor["count"] == 140
    extended = [op for op in patch["operations"] if op["location"] == ["data", 0, "x"]]
    assert [op["params"]["value"] for op in extended] == [list(range(101, 141))]
    append(141, 150)
    _, cursor = tick(cursor)                            # 150 points: still extended
    assert cursor["count"] == 150 and cursor["first"] == 0
    append(151, 151)
    figure, cursor = tick(cursor)                       # 151 > 1.5 rings: redrawn from the ring's last 100 steps
    assert figure["data"][0]["x"] == list(range(52, 152)) and cursor["first"] == 51
    assert figure["data"][0]["y"] == pytest.approx([1.0 / s for s in range(52, 152)])
    hub.stop()


def test_the_accuracy_panel_says_when_no_accuracy_is_logged_and_autoranges_once_one_is():
    """A GAN or a regression logs no accuracy: the panel was an empty axis from -1 to 4."""
    state = RunState("no-accuracy")
    hub, tick = training_chart(state)
    try:
        for step in (1, 2):
            message = step_message(step, loss=1.0)
            message.body["metrics"] = {}
            state.apply(message)
        figure, cursor = tick(None)
        assert figure["layout"]["yaxis2"]["title"]["text"] == "accuracy (none logged)"
        assert figure["layout"]["yaxis2"]["range"] == [0, 1]
        state.apply(step_message(3, loss=1.0))                      # logs train_acc 0.5
        patch, cursor = tick(cursor)
        changed = {tuple(op["location"]): op["params"]["value"] for op in patch["operations"]
                   if op["operation"] == "Assign"}
        assert changed[("layout", "yaxis2", "title", "text")] == "accuracy"
        assert changed[("layout", "yaxis2", "autorange")] is True
        _, cursor = tick(cursor)
        assert cursor["acc"] is True
    finally:
        hub.stop()


def test_the_smoothed_loss_goes_on_across_patches_as_one_moving_average_would():
    """TensorBoard's smoothing (a debiased EMA) drawn whole, then extended by a Patch: the same values as the
    average computed over every step at once."""
    from revacnn_dash.figures.training import smoothed

    state = RunState("smooth")
    hub, tick = training_chart(state, smoothing=0.9)
    try:
        losses = [2.0 / (1 + s) + (0.3 if s % 3 == 0 else 0.0) for s in range(1, 61)]
        for step in range(1, 41):
            state.apply(step_message(step, loss=losses[step - 1]))
        figure, cursor = tick(None)
        ema = []
        total = 0.0
        for i, loss in enumerate(losses, start=1):       # computed here independently: debiased EMA, weight 0.9
            total = 0.9 * total + 0.1 * loss
            ema.append(total / (1 - 0.9 ** i))
        assert figure["data"][5]["y"] == pytest.approx(ema[:40])
        assert figure["data"][0]["opacity"] < 1            # the raw loss drawn faint under it
        for step in range(41, 61):
            state.apply(step_message(step, loss=losses[step - 1]))
        patch, cursor = tick(cursor)
        extended = [op["params"]["value"] for op in patch["operations"] if op["location"] == ["data", 5, "y"]]
        assert extended[0] == pytest.approx(ema[40:])
        assert smoothed([1.0, float("nan"), 3.0], 0.0)[0] == [1.0, None, 3.0]    # no smoothing; NaN is a gap
    finally:
        hub.stop()

def test_per_filter_history_is_bounded_in_bytes_and_keeps_the_newest():
    """A ResNet-50's per-filter steps (5 × 27,570 float32, 0.55 MB each) held 141 MB at 256 of them."""
    from revacnn_dash.data.state import FILTER_HISTORY_BYTES, RunState

    state = RunState("t")
    state.apply(Message("structure", {"revision": 0, "layers": [{"name": "big", "type": "Conv2d", "out": 27570}]}))
    for step in range(1, 80):
        state.apply(Message("step", {"step": step, "loss": 1.0, "per_filter": True, "layer_names": ["big"]},
                            {"filters": np.full((5, 27570), step, dtype=np.float32)}))
    held = sum(a.nbytes for _, _, a, _ in state.filter_steps)
    assert held <= FILTER_HISTORY_BYTES and len(state.filter_steps) == FILTER_HISTORY_BYTES // (5 * 27570 * 4)
    step, arr, _ = state.latest_filters()
    assert step == 79 and arr[0, 0] == 79
    # one step bigger than the bound is still kept: the views need the newest
    state.apply(Message("step", {"step": 80, "loss": 1.0, "per_filter": True, "layer_names": ["big"]},
                        {"filters": np.zeros((5, FILTER_HISTORY_BYTES // 4), dtype=np.float32)}))
    assert len(state.filter_steps) == 1 and state.latest_filters()[0] == 80


def test_runs_are_named_by_module_class_and_start_time():
    from revacnn_dash.data.state import run_name

    assert run_name("20261207-140312-ab12cd", {"model": "ClassifierModule"}) == \
        "ClassifierModule · Dec 07 14:03:12 · 20261207-140312-ab12cd"
    assert run_name("20261207-140312-ab12cd", None) == "Dec 07 14:03:12 · 20261207-140312-ab12cd"
    assert run_name("my-run", {"model": "M"}) == "M · my-run"          # a directory named by hand: no time
    # the user's name (ReVACNNCallback(name=...)) first
    assert run_name("20261207-140312-ab12cd", {"model": "ClassifierModule", "name": "baseline lr 0.1"}) == \
        "baseline lr 0.1 · ClassifierModule · Dec 07 14:03:12 · 20261207-140312-ab12cd"
    assert run_name("my-run", {"model": "M", "name": None}) == "M · my-run"


def test_the_overlay_draws_the_loss_of_each_chosen_run_under_its_name():
    from revacnn_dash.data.hub import Hub
    from revacnn_dash.data.state import RunState
    from dash import no_update

    from revacnn_dash.figures.run_overlay import thinned
    from revacnn_dash.views.run_overlay import overlay_view

    hub = Hub([], warm_umap=False)
    try:
        runs = []
        for i, run_id in enumerate(("20261207-140312-aaaaaa", "20261207-150000-bbbbbb")):
            state = RunState(f"t{i}")
            state.run_id = run_id
            state.apply(Message("structure", {"revision": 0, "model": f"Module{i}", "layers": []}))
            for step in range(1, 31):
                state.apply(step_message(step, (i + 1) / step))
            hub.runs[state.key] = state
            runs.append(state)
        fig, sig = overlay_view(hub, 0, [r.key for r in runs], ["log"], None)
        assert [t.name for t in fig.data] == [
            "● live: Module0 · Dec 07 14:03:12 · 20261207-140312-aaaaaa (connecting)",
            "● live: Module1 · Dec 07 15:00:00 · 20261207-150000-bbbbbb (connecting)"]
        assert list(fig.data[1].x) == list(range(1, 31)) and fig.data[1].y[9] == pytest.approx(2 / 10)
        assert fig.layout.yaxis.type == "log"
        assert overlay_view(hub, 1, [r.key for r in runs], ["log"], sig) == (no_update, no_update)  # nothing new
        runs[0].apply(step_message(31, 0.01))
        assert len(overlay_view(hub, 2, [r.key for r in runs], ["log"], sig)[0].data[0].x) == 31
    finally:
        hub.stop()
    # a long curve is thinned to at most 2,000 points, its last kept; a diverged step is left out
    steps, values = np.arange(20000.0), np.ones(20000)
    values[5] = np.nan
    x, y = thinned(steps, values)
    assert len(x) <= 2001 and x[-1] == 19999 and 5 not in x and all(v == 1.0 for v in y)
