"""A run the user named (``ReVACNNCallback(name=...)``, issue 28): a real Lightning Trainer sends the name in its
``structure``, the recording writes it to run.json, and the dashboard's run label puts it first, live (a real
``RunWorker`` over ZeroMQ) and replayed. The replayed run's network view, zoomed onto its density strip, draws that
layer filter by filter (the level of detail works on a recording as on a live run)."""

from __future__ import annotations

import json

import pytest

from browser_support import free_port
from helpers import quiet_trainer, wait_for

NAME = "baseline lr 0.1 · ünïcode ok"
WIDE = 40       # conv1's filters: past the view's 32 nodes a column, a density strip


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
    from revacnn_dash.data.state import RunState
    from revacnn_dash.data.worker import RunWorker

    root = tmp_path_factory.mktemp("named")
    port = free_port()
    state = RunState(f"tcp://127.0.0.1:{port}")
    worker = RunWorker(state, silence_s=30.0, retry_s=0.2)
    worker.start()
    callback = ReVACNNCallback(name=NAME, control_port=port, filters_every=2, snapshot_every=4)
    trainer = quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=[callback], default_root_dir=root)
    try:
        trainer.fit(ClassifierModule(ReVACNNNet((WIDE, 20, 20)), lr=0.05), DigitsDataModule(batch_size=32))
        wait_for(lambda: state.structure is not None and state.latest_filters() is not None)
        live = state.summary(), dict(state.structure or {})
    finally:
        worker.stop()
    return root, live


def test_the_recording_and_a_live_dashboard_show_the_users_name(named_run):
    from revacnn_dash.data.state import run_name

    root, (summary, structure) = named_run
    (info,) = [json.loads(p.read_text()) for p in root.rglob("run.json")]
    assert info["name"] == NAME
    assert structure["name"] == NAME and summary["name"] == NAME
    label = run_name(summary["run_id"], structure)
    assert label.startswith(f"{NAME} · ClassifierModule · ") and label.endswith(summary["run_id"])


def test_a_replayed_named_run_is_labelled_by_its_name_and_zooms_its_strip_to_single_filters(named_run):
    from revacnn_dash.data.hub import Hub
    from revacnn_dash.views.network import layout_token, network_view

    root, _ = named_run
    hub = Hub([], logdir=str(root), warm_umap=False)
    try:
        hub.scan_logdir()
        (option,) = hub.options()
        assert option["label"].startswith(f"◼ recorded: {NAME} · ClassifierModule · ")
        key = option["value"]
        overview, *_ = network_view(hub, None, None, key, None, "network", None)
        strips = next(t for t in overview.data if t.uid == "revacnn-strips")
        assert {json.loads(cell)[0] for row in strips.customdata for cell in row if cell} == {"net.conv1"}
        zoom = {"token": layout_token(None, key), "x": [-0.5, 0.5]}       # conv1's column alone in view
        zoomed, *_ = network_view(hub, None, None, key, zoom, "network", None)
    finally:
        hub.stop()
    assert not any(t.uid == "revacnn-strips" for t in zoomed.data)
    nodes = next(t for t in zoomed.data if t.uid == "revacnn-nodes")
    assert [c[1] for c in nodes.customdata if c[0] == "net.conv1"] == list(range(WIDE))
    assert list(zoomed.layout.xaxis.range) == [-0.5, 0.5]


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "tab\there", "x" * 101, 3, b"bytes"])
def test_a_bad_run_name_is_refused_when_the_callback_is_made(name):
    from revacnn import ReVACNNCallback

    with pytest.raises(ValueError, match="name must be"):
        ReVACNNCallback(name=name)


def test_a_run_name_of_100_printable_characters_is_kept_as_given():
    from revacnn import ReVACNNCallback

    assert ReVACNNCallback(name="é" * 100).run_name == "é" * 100
    assert ReVACNNCallback().run_name is None
