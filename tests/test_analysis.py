"""Analysis views' computations (revacnn_dash.analysis) on runs recorded by the test itself: a real Trainer run
steered mid-run (widen + remove on net.conv2) and synthetic recordings written through RunRecorder with known
weights. Comparison numbers are checked against independently computed ones, the anomaly rule against a hand-built
case, pyramids against the raw data at every level."""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from revacnn.wire.protocol import FILTER_FIELDS, Message
from revacnn.recording import RunRecorder
from revacnn.recording.reader import open_run
from revacnn_dash.analysis.compare import compare_snapshots, cosine, log_change, relative_l2, zero_floor
from revacnn_dash.analysis.explorer import (bucket_quantiles, build_tree, derived_cosine, filter_chart,
                                            horizon_bands, layer_overview, node_layers, order_filters)
from revacnn_dash.analysis.observations import channel_concentration, hopkins, mean_nn_cosine, track_observations
from revacnn_dash.analysis.tracking import anomalies, cube, stable_flips, top_changed
from revacnn_dash.figures.explorer_charts import cube_figure

from helpers import quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
_RUNS: dict[str, Path] = {}


def recorded_run() -> Path:
    """A real Trainer run (ReVACNNNet on 16×16 digits, 3 epochs × 10 batches, per-filter data every step,
    snapshots every 10 steps), steered at step 12 (widen net.conv2 by 2, then remove two of its filters) through
    the run's own control socket. Recorded once per test session (shared with the browser tests)."""
    if "steered" in _RUNS:
        return _RUNS["steered"]
    import pytorch_lightning as pl
    import torch

    from revacnn import ReVACNNCallback
    from revacnn.wire.client import RunClient
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet

    class Steer(pl.Callback):
        def __init__(self, callback):
            self.callback, self.client = callback, None

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 12:
                self.client = RunClient(self.callback.connection_file)
                self.client.connect()
                self.client.send_command("widen", {"layer": "net.conv2", "count": 2})
                self.client.send_command("remove_filters", {"layer": "net.conv2", "filters": [0, 5]})

        def on_train_end(self, *args):
            if self.client is not None:
                self.client.close()

    root = Path(tempfile.mkdtemp(prefix="revacnn-analysis-"))
    atexit.register(shutil.rmtree, root, True)
    torch.manual_seed(1)
    callback = ReVACNNCallback(filters_every=1, snapshot_every=10)
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=10, callbacks=[callback, Steer(callback)],
                            default_root_dir=root, num_sanity_val_steps=0, logger=pl.loggers.CSVLogger(root))
    trainer.fit(ClassifierModule(ReVACNNNet(image_size=16), lr=0.05), DigitsDataModule(batch_size=32, image_size=16))
    _RUNS["steered"] = Path(callback.run_dir)
    return _RUNS["steered"]


def write_synthetic(run_dir: Path, widths=(4, 6), records: int = 240, every: int = 1, seed: int = 0, **policy):
    """A recording with known weights: each layer's filters random-walk; the per-filter fields are computed from
    them exactly as the callback defines them. Returns (run_dir, weights [records+1] per layer, steps)."""
    rng = np.random.default_rng(seed)
    names = [f"stage{i // 2}.block{i % 2}.conv" for i in range(len(widths))]
    layers, next_id = [], 0
    for name, width in zip(names, widths):
        layers.append({"name": name, "kind": "conv", "out": width, "filter_ids": list(range(next_id, next_id + width)),
                       "weight_shape": [width, 3, 3, 3]})
        next_id += width
    rec = RunRecorder(run_dir, queue_size=records + 100, **policy)
    rec.submit(Message("structure", {"step": 0, "revision": 0, "layers": layers, "layer_edges": []}, run="syn",
                       seq=1, time=time.time()))
    weights = {name: [rng.normal(size=(w, 27))] for name, w in zip(names, widths)}
    steps = []
    for r in range(records):
        step = (r + 1) * every
        cols, ratios = [], []
        for name in names:
            prev = weights[name][-1]
            scale = 0.02 if (r % 50) else 0.4          # an occasional large turn
            cur = prev + rng.normal(scale=scale, size=prev.shape)
            weights[name].append(cur)
            grad = rng.normal(size=prev.shape)
            update = np.linalg.norm(cur - prev, axis=1) / np.linalg.norm(prev, axis=1) if r else np.zeros(len(cur))
            cols.append(np.stack([np.abs(grad).mean(1), (grad ** 2).mean(1), np.linalg.norm(cur, axis=1), update,
                                  rng.random(len(cur))]))
            ratios.append(np.linalg.norm(grad) / np.linalg.norm(cur))
        body = {"step": step, "epoch": 0, "batch": step, "loss": 1.0, "metrics": {}, "groups": [{"lr": 0.1}],
                "batch_size": 8, "samples_per_s": 1.0, "drops": {"telemetry": 0, "recording": 0}, "per_filter": True,
                "filter_fields": list(FILTER_FIELDS), "layer_names": names}
        rec.submit(Message("step", body, {"filters": np.concatenate(cols, 1).astype(np.float32),
                                          "layers": np.asarray(ratios, np.float32)}, run="syn", seq=r + 2,
                           time=time.time()))
        steps.append(step)
    rec.close()
    # weights[name][r + 1] is the weight measured at record r (the first record has no previous weights)
    return run_dir, {n: np.stack(w[1:]) for n, w in weights.items()}, np.asarray(steps)


@pytest.fixture(scope="module")
def steered():
    return open_run(recorded_run())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    # everything kept at full resolution, plus levels 1 (10 records) and 2 (100 records)
    run_dir, weights, steps = write_synthetic(tmp_path_factory.mktemp("syn") / "run", records=240, levels=3,
                                              full_records=100000, keep_buckets=100000)
    return open_run(run_dir), weights, steps


# -- measures ------------------------------------------------------------------------------------------------------
def dash_call(client, deps, output_part, inputs, state=(), changed=None) -> dict:
    """One Dash callback request through Flask's test client, as the page makes it: the callback whose output
    includes ``output_part``, with ``(id, property, value)`` inputs and state. Returns what it updated."""
    dep = next(d for d in deps if output_part in d["output"])
    outputs = [{"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
               for part in dep["output"].strip(".").split("...")]
    pack = lambda items: [{"id": i, "property": p, "value": v} for i, p, v in items]  # noqa: E731
    response = client.post("/_dash-update-component", json={
        "output": dep["output"], "outputs": outputs, "inputs": pack(inputs), "state": pack(state),
        "changedPropIds": [changed or f"{inputs[0][0]}.{inputs[0][1]}"]})
    assert response.status_code in (200, 204), response.data[:300]
    return {} if response.status_code == 204 else response.get_json()["response"]   # {}: nothing updated


def test_log_change_rule_for_zeros_and_sign_changes():
    a = np.array([1.0, 2.0, 0.0, 0.0, 3.0, -1.0, -2.0])
    b = np.array([2.0, 1.0, 0.0, 5.0, 0.0, 1.0, -4.0])
    log, kind = log_change(a, b, floor=0.01)
    assert log[0] == pytest.approx(np.log(2)) and log[1] == pytest.approx(-np.log(2))
    assert log[2] == 0 and kind[2] == 1                              # both zero
    assert log[3] == pytest.approx(np.log(5 / 0.01)) and kind[3] == 2  # from zero: clipped at the floor
    assert log[4] == pytest.approx(np.log(0.01 / 3)) and kind[4] == 3  # to zero
    assert np.isnan(log[5]) and kind[5] == 4                         # sign flip: not a relative change
    assert log[6] == pytest.approx(np.log(2)) and kind[6] == 0       # same sign, negative
    # symmetric and additive on normal pairs
    c = np.array([4.0, 0.5, 0, 0, 1, 1, -1])
    ab, _ = log_change(a[:2], b[:2], 0.01)
    bc, _ = log_change(b[:2], c[:2], 0.01)
    ac, _ = log_change(a[:2], c[:2], 0.01)
    np.testing.assert_allclose(ab + bc, ac)
    np.testing.assert_allclose(log_change(b[:2], a[:2], 0.01)[0], -ab)
    assert zero_floor(np.array([3.0, 4.0])) == pytest.approx(1e-3 * np.sqrt(12.5))


def test_comparison_of_two_steps_equals_independent_numbers(steered):
    run = steered
    a, b = run.snapshot(10), run.snapshot(30)
    comp = compare_snapshots(a, b, run.structures())
    conv2 = comp.layers["net.conv2"]
    bodies = {body["revision"]: body for _, body in run.structures()}
    ids_a = next(l for l in bodies[a["body"]["revision"]]["layers"] if l["name"] == "net.conv2")["filter_ids"]
    ids_b = next(l for l in bodies[b["body"]["revision"]]["layers"] if l["name"] == "net.conv2")["filter_ids"]
    assert set(conv2.removed) == set(ids_a) - set(ids_b) and len(conv2.removed) == 2
    assert set(conv2.new) == set(ids_b) - set(ids_a) and len(conv2.new) == 2
    assert conv2.inputs_matched == "by id"
    # an unsteered layer: plain per-filter numbers
    wa, wb = a["arrays"]["weight/net.conv1"].astype(np.float64), b["arrays"]["weight/net.conv1"].astype(np.float64)
    conv1 = comp.layers["net.conv1"]
    for i in range(16):
        x, y = wa[i].ravel(), wb[i].ravel()
        assert conv1.filter_rel_l2[i] == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), rel=1e-9)
        assert conv1.filter_cosine[i] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), rel=1e-9)
    assert conv1.rel_l2 == pytest.approx(np.linalg.norm(wb - wa) / np.linalg.norm(wa), rel=1e-9)
    # a kept conv2 filter: same id, found at different rows
    fid = conv2.kept[3]
    x = a["arrays"]["weight/net.conv2"][ids_a.index(fid)].astype(np.float64)
    y = b["arrays"]["weight/net.conv2"][ids_b.index(fid)].astype(np.float64)
    assert conv2.filter_rel_l2[3] == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), rel=1e-9)
    # conv3's input channels are conv2's filters: matched by id, new/removed inputs left out
    conv3 = comp.layers["net.conv3"]
    common = [i for i in ids_b if i in ids_a]
    x = a["arrays"]["weight/net.conv3"][:, [ids_a.index(i) for i in common]].astype(np.float64)
    y = b["arrays"]["weight/net.conv3"][:, [ids_b.index(i) for i in common]].astype(np.float64)
    assert conv3.rel_l2 == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), rel=1e-9)
    assert conv3.cosine == pytest.approx((x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y), rel=1e-9)
    log, kind = log_change(x.reshape(20, -1), y.reshape(20, -1), zero_floor(x.reshape(20, -1)))
    assert conv3.sign_flips == pytest.approx((kind == 4).mean())
    assert conv3.log_median == pytest.approx(np.median(np.abs(log[kind == 0])))
    # activations on the same probe images, matched channels
    act_a, act_b = a["arrays"]["act/net.conv2"], b["arrays"]["act/net.conv2"]
    pa = act_a[:, [ids_a.index(i) for i in conv2.kept]].astype(np.float64)
    pb = act_b[:, [ids_b.index(i) for i in conv2.kept]].astype(np.float64)
    assert comp.probes_comparable
    assert conv2.act_rel == pytest.approx(np.linalg.norm(pb - pa) / np.linalg.norm(pa), rel=1e-9)
    # filter level: new and removed filters are reported as such
    pair = comp.filter_pair("net.conv2", conv2.new[0])
    assert pair["status"] == "new" and pair["a"] is None and pair["b"].shape == (16, 5, 5)
    pair = comp.filter_pair("net.conv2", conv2.removed[0])
    assert pair["status"] == "removed" and pair["b"] is None and pair["act_b"] is None
    pair = comp.filter_pair("net.conv3", conv3.kept[0])
    assert pair["a"].shape == (len(common), 5, 5) and pair["act_a"].shape == pair["act_b"].shape
    np.testing.assert_allclose(pair["diff"], pair["b"] - pair["a"])


def test_comparison_of_two_runs_and_scalar_helpers(steered):
    run = steered
    comp = compare_snapshots(run.snapshot(1), run.snapshot(1), run.structures(), run.structures())
    for row in comp.network():
        assert row["rel_l2"] == 0 and row["cosine"] == pytest.approx(1.0) and row["new"] == row["removed"] == 0
    assert relative_l2(np.zeros(3), np.zeros(3)) == 0 and np.isnan(relative_l2(np.zeros(2), np.ones(2)))
    assert cosine(np.zeros(2), np.zeros(2)) == 1 and cosine([1, 0], [0, 2]) == 0


def test_the_anchor_of_insert_layer_is_compared_with_itself(tmp_path):
    """insert_layer keeps its anchor's name: a snapshot before compares conv1 with conv1 after, and the inserted
    conv is new. (It used to move the anchor into a Sequential, conv1 → conv1.0, and the comparison lost it.)"""
    import pytorch_lightning as pl
    import torch
    from test_steering_callback import Script

    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet

    torch.manual_seed(2)
    callback = ReVACNNCallback(filters_every=0, snapshot_every=4, run_dir=tmp_path / "run")
    script = Script(callback, {5: [("insert_layer", {"after": "net.conv1"})]})
    trainer = quiet_trainer(max_steps=8, callbacks=[callback, script], limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.05), DigitsDataModule(batch_size=32))
    assert [ack["status"] for ack in script.acks] == ["done"]
    run = open_run(callback.run_dir)
    a, b = run.snapshot(4), run.snapshot(8)
    comp = compare_snapshots(a, b, run.structures())
    conv1 = comp.layers["net.conv1"]
    assert conv1.name_a is None and len(conv1.kept) == 16 and not conv1.new and not conv1.removed  # not renamed
    wa, wb = a["arrays"]["weight/net.conv1"].astype(np.float64), b["arrays"]["weight/net.conv1"].astype(np.float64)
    assert conv1.rel_l2 == pytest.approx(np.linalg.norm(wb - wa) / np.linalg.norm(wa), rel=1e-6)
    pair = comp.filter_pair("net.conv1", conv1.kept[3])
    np.testing.assert_array_equal(pair["act_a"], a["arrays"]["act/net.conv1"][:, 3])
    assert "weight/net.conv1.inserted.conv" in b["arrays"] and "weight/net.conv1.inserted.conv" not in a["arrays"]
    assert all(layer.name_a is None for layer in comp.layers.values())  # nothing was renamed


def test_weight_norm_of_a_record_is_the_previous_steps_weight(steered):
    """The assumption behind the derived cosine: the per-filter record of step s+1 measures the weights the
    snapshot of step s holds (before the optimizer step)."""
    run = steered
    series = run.filter_series("net.conv1", "weight_norm", 21, 22)
    w = run.snapshot(20)["arrays"]["weight/net.conv1"].reshape(16, -1)
    np.testing.assert_allclose(series["values"][0], np.linalg.norm(w, axis=1), rtol=1e-5)


# -- explorer --------------------------------------------------------------------------------------------------------
def test_hierarchy_from_module_names():
    names = ["net.conv1", "net.layer1.0.conv1", "net.layer1.0.conv2", "net.layer1.1.conv1", "net.layer2.0.conv1",
             "net.layer2.0.shortcut.0", "net.fc"]
    tree = build_tree(names)
    nodes = tree["nodes"]
    # a node that is not a layer and has a single child is merged into it ("net", "layer2" → "layer2.0", …)
    assert nodes["model"]["children"] == ["net.conv1", "net.layer1", "net.layer2.0", "net.fc"]
    assert nodes["net.layer1"]["children"] == ["net.layer1.0", "net.layer1.1.conv1"]
    assert nodes["net.layer1.1.conv1"]["name"] == "1.conv1"
    assert nodes["net.layer2.0"]["name"] == "layer2.0"
    assert nodes["net.layer2.0"]["children"] == ["net.layer2.0.conv1", "net.layer2.0.shortcut.0"]
    assert nodes["net.layer2.0.shortcut.0"]["name"] == "shortcut.0"
    assert node_layers(tree, "model") == names and node_layers(tree, "net.layer1.0") == names[1:3]
    assert [nodes[n]["depth"] for n in ("net.conv1", "net.layer1", "net.layer1.0", "net.layer1.0.conv1")] == \
        [1, 1, 2, 3]


def test_bucket_quantiles_equal_numpy():
    rng = np.random.default_rng(3)
    values = rng.random((103, 4))
    values[5, 2] = np.nan
    out = bucket_quantiles(np.arange(103) * 10, values, 10)
    size = 11
    for g in range(len(out["step"])):
        chunk = values[g * size:(g + 1) * size].ravel()
        for key, q in (("min", 0), ("q1", 25), ("median", 50), ("q3", 75), ("max", 100)):
            assert out[key][g] == pytest.approx(np.nanpercentile(chunk, q))
        assert out["mean"][g] == pytest.approx(np.nanmean(chunk))
        assert out["step"][g] == g * size * 10
    pos, neg, height = horizon_bands(np.array([0.0, 3.0, -3.0, 1.0]), bands=3, baseline=0.0)
    assert height == 1 and pos[:, 1].tolist() == [1, 1, 1] and neg[:, 2].tolist() == [1, 1, 1]
    assert pos[:, 3].tolist() == [1, 0, 0]


def test_pyramids_agree_with_raw_data_at_every_level(synthetic):
    run, weights, steps = synthetic
    layer = "stage0.block0.conv"
    raw = run.filter_series(layer, "update_ratio")
    np.testing.assert_array_equal(raw["step"], steps)
    for resolution in (240, 30, 24, 3, 2):          # level 0, 1, 1, 2, re-bucketed
        series = run.filter_series(layer, "update_ratio", resolution=resolution)
        assert len(series["step"]) <= resolution
        chart = filter_chart(run, layer, "update_ratio", resolution=resolution, order="none")
        if resolution >= 240:
            np.testing.assert_allclose(chart["values"], raw["values"].T)
            continue
        for row, (first, last) in enumerate(zip(series["step"], series["step_end"])):
            block = raw["values"][(raw["step"] >= first) & (raw["step"] <= last)]
            np.testing.assert_allclose(series["values"][row], block.mean(0), rtol=1e-5)
            np.testing.assert_allclose(series["min"][row], block.min(0), rtol=1e-6)
            np.testing.assert_allclose(series["max"][row], block.max(0), rtol=1e-6)
            np.testing.assert_allclose(chart["values"][:, row], block.mean(0), rtol=1e-5)
        assert series["step_end"][-1] == steps[-1] and series["step"][0] == steps[0]
    # the overview over the layers stream at any resolution equals quantiles of the raw per-layer values
    tree = build_tree(run.layer_names())
    layers = run.layer_series()
    for resolution in (240, 17):
        overview = layer_overview(run, tree, resolution=resolution)
        node = overview["nodes"]["model"]
        size = int(np.ceil(240 / resolution))
        np.testing.assert_allclose(node["median"][1], np.median(layers["values"][size:2 * size]), rtol=1e-6)
        assert overview["raw"] == (resolution >= 240)
    # a per-filter field: each layer's filters averaged, from its pyramid at the display resolution
    per_filter = layer_overview(run, tree, resolution=24, field="update_ratio")
    series = run.filter_series("stage0.block0.conv", "update_ratio", resolution=24)
    np.testing.assert_allclose(per_filter["nodes"]["stage0.block0.conv"]["median"],
                               np.nanmean(series["values"], axis=1), rtol=1e-5)
    zoomed = layer_overview(run, tree, start=100, stop=140, resolution=400)
    assert zoomed["raw"] and zoomed["nodes"]["model"]["step"].tolist() == list(range(100, 140))


def test_derived_cosine_equals_cosine_of_the_known_weights(synthetic):
    run, weights, steps = synthetic
    layer = "stage0.block1.conv"
    chart = filter_chart(run, layer, "cosine", resolution=None, order="none")
    w = weights[layer]
    expected = np.sum(w[1:] * w[:-1], axis=2) / np.linalg.norm(w[1:], axis=2) / np.linalg.norm(w[:-1], axis=2)
    np.testing.assert_allclose(chart["values"][:, 1:], expected.T, atol=2e-5)
    assert chart["exact"] and chart["raw"]
    coarse = filter_chart(run, layer, "cosine", resolution=24, order="none")
    assert not coarse["exact"] and coarse["values"].shape == (6, 24)
    # grad_weight_ratio = sqrt(grad_sq_mean * n) / ‖w‖ with n = 27 coefficients
    sq = run.filter_series(layer, "grad_sq_mean")["values"]
    norms = run.filter_series(layer, "weight_norm")["values"]
    gw = filter_chart(run, layer, "grad_weight_ratio", resolution=None, order="none")
    np.testing.assert_allclose(gw["values"], (np.sqrt(sq * 27) / norms).T, rtol=1e-5)
    assert derived_cosine(np.array([[1.0], [1.0]]), np.array([[0.0], [0.0]]))[1, 0] == pytest.approx(1.0)


def test_similarity_order_groups_similar_filters():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 6, 50)
    rows = [np.sin(t) + 0.05 * rng.normal(size=50) for _ in range(5)] + \
           [np.cos(3 * t) + 0.05 * rng.normal(size=50) for _ in range(5)]
    order = np.random.default_rng(1).permutation(10)
    matrix = np.stack(rows)[order]
    group = (order >= 5).astype(int)
    for method in ("pca", "spectral"):
        ranked = group[order_filters(matrix, method)]
        assert np.count_nonzero(np.diff(ranked)) == 1, method   # the two groups end up contiguous
    assert order_filters(matrix, "none").tolist() == list(range(10))


# -- anomalies and cube ------------------------------------------------------------------------------------------------
def test_anomaly_rule_matches_a_hand_built_case():
    # rows: validation samples (iterations); columns: images. 1 = correct
    c = np.array([[1, 0, 1, 1, 0],
                  [1, 0, 1, 0, 0],
                  [1, 0, 1, 1, 0],
                  [1, 0, 0, 1, 1],
                  [0, 1, 0, 1, 1],
                  [0, 1, 0, 1, 1]], bool)
    back = stable_flips(c, window=3, direction="backward")
    expected = np.zeros_like(c)
    expected[4, 0] = True        # correct for 4 samples, then wrong
    expected[3, 2] = True        # correct for 3 samples, then wrong
    expected[4, 1] = True        # wrong for 4, then right
    expected[3, 4] = True        # wrong for 3, then right
    # image 3 flips at rows 1, 2, 3 but was never stable for 3 samples before
    np.testing.assert_array_equal(back, expected)
    assert not stable_flips(c, window=5).any()
    fwd = stable_flips(c, window=2, direction="forward")
    expected_fwd = np.zeros_like(c)
    for row, col in ((3, 0), (3, 1), (2, 2), (1, 3), (2, 4)):   # differs from each of the next 2 samples
        expected_fwd[row, col] = True
    np.testing.assert_array_equal(fwd, expected_fwd)
    val = {"steps": np.arange(6) * 10, "pred": np.where(c, 1, 2).astype(np.int16),
           "label": np.ones(5, np.int16), "metrics": {}}
    info = anomalies(val, window=3, threshold=2)
    assert info["counts"][1].tolist() == [0, 0, 0, 2, 2, 0]
    assert info["flagged_pairs"] == [(1, 30), (1, 40)]
    info = anomalies(val, window=3, threshold=3)
    assert info["flagged_pairs"] == []
    np.testing.assert_allclose(info["error"][1], 1 - c.mean(1))


def test_top_changed_and_cube_match_independent_computation(synthetic):
    run, weights, steps = synthetic
    layers = run.layer_names()
    top = top_changed(run, layers, 40, 100, k=3)
    for layer in layers:
        w = weights[layer]
        cos = np.sum(w[1:] * w[:-1], axis=2) / np.linalg.norm(w[1:], axis=2) / np.linalg.norm(w[:-1], axis=2)
        rows = (steps[1:] > 40) & (steps[1:] <= 100)
        change = (1 - cos[rows]).sum(0)
        assert top[layer] == [int(i) + run.structures()[-1][1]["layers"][layers.index(layer)]["filter_ids"][0]
                              for i in np.argsort(-change)[:3]]


def test_cube_figure_cells_match_an_independent_computation(synthetic):
    run, weights, steps = synthetic
    layers = run.layer_names()
    ids = {l["name"]: l["filter_ids"] for l in run.structures()[-1][1]["layers"]}
    val_steps = [40, 100, 160, 220]
    # classes × validation steps: class 0 flagged at 100 and 220, class 2 at 160, class 1 never
    flagged = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]], bool)
    data = cube(run, layers, {"steps": np.array(val_steps), "flagged": flagged}, k=2)

    def top2(layer, lo, hi):      # Σ(1 − cos) between consecutive weights over the records in (lo, hi]
        w = weights[layer]
        cos = np.sum(w[1:] * w[:-1], axis=2) / np.linalg.norm(w[1:], axis=2) / np.linalg.norm(w[:-1], axis=2)
        rows = (steps[1:] > lo) & (steps[1:] <= hi)
        return {ids[layer][i] for i in np.argsort(-(1 - cos[rows]).sum(0))[:2]}

    bounds = list(zip([0] + val_steps[:-1], val_steps))
    cells = {layer: [top2(layer, lo, hi) for lo, hi in bounds] for layer in layers}
    assert data["steps"] == val_steps
    assert data["cells"] == [[sorted(c) for c in cells[layer]] for layer in layers]
    for klass, at in ((None, [1, 2, 3]), (0, [1, 3]), (1, []), (2, [2])):
        expected = [[len(cell & set().union(*(cells[layer][j] for j in at if j != t)))
                     for t, cell in enumerate(cells[layer])] for layer in layers]
        fig, detail = cube_figure(data, klass, None)
        heat = fig.data[0]
        assert list(heat.x) == val_steps and list(heat.y) == layers and detail == ""
        np.testing.assert_array_equal(np.asarray(heat.z), expected)
        marks = sorted(shape.x0 for shape in fig.layout.shapes)
        assert marks == [val_steps[j] for j in at]
    assert np.asarray(cube_figure(data, None, None)[0].data[0].z).any()   # the shared filters are not all empty
    # a pinned cell: every cell of its layer coloured by its overlap with the pinned one, its step in the detail
    fig, detail = cube_figure(data, 0, {"layer": layers[1], "step": 160})
    z = np.asarray(fig.data[0].z)
    assert z[0].tolist() == [0] * 4
    assert z[1].tolist() == [len(cells[layers[1]][2] & c) for c in cells[layers[1]]]
    assert detail.startswith(f"pinned: {layers[1]} at step 160 (classes flagged: 2)")


# -- observations ----------------------------------------------------------------------------------------------------
def test_diversity_and_colour_measures():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 75))
    clustered = np.concatenate([c + 0.05 * rng.normal(size=(10, 75)) for c in centres])
    spread = rng.normal(size=(30, 75))
    assert hopkins(clustered) > 0.75 > hopkins(spread) - 0.1
    assert mean_nn_cosine(clustered) > 0.9 > 0.5 > mean_nn_cosine(spread)
    w = np.zeros((3, 3, 5, 5))
    w[0, 1] = rng.normal(size=(5, 5))              # one channel only
    w[1] = rng.normal(size=(5, 5))                 # the same pattern on all three channels
    w[2, 0], w[2, 2] = 1.0, 1.0                    # two channels
    conc = channel_concentration(w)
    assert conc[0] == pytest.approx(1.0) and conc[1] == pytest.approx(0.0) and conc[2] == pytest.approx(0.25)


def test_observations_tracked_over_the_steered_run(steered):
    out = track_observations(steered)
    assert out["step"] == steered.snapshot_steps()
    assert set(out["hopkins"]) == {"net.conv1", "net.conv2", "net.conv3"}
    assert len(out["concentration_mean"]) == len(out["step"]) and np.isfinite(out["val_acc"][-1])


def test_nothing_under_dashboard_imports_torch():
    code = ("import sys; import revacnn_dash.analysis as a; from revacnn_dash.analysis import pages, compare, "
            "explorer, tracking, observations; assert 'torch' not in sys.modules and "
            "'pytorch_lightning' not in sys.modules, [m for m in sys.modules if 'torch' in m]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_explorer_and_the_comparison_follow_a_run_still_being_recorded(tmp_path):
    """While the page is shown (its tab tick), the explorer's views re-read a growing recording — at most every
    LIVE_REFRESH_S, and only when it got data — and the comparison's step menus list the new snapshots."""
    from revacnn_dash.analysis.pages import LIVE_REFRESH_S
    from revacnn_dash.app import create_app
    from revacnn_dash.data.hub import Hub

    run_dir = tmp_path / "logs" / "run"
    recorder = RunRecorder(run_dir)
    seq = iter(range(1, 1000))
    layer = {"name": "conv", "kind": "conv", "out": 2, "filter_ids": [0, 1], "weight_shape": [2, 1, 3, 3]}
    recorder.submit(Message("structure", {"step": 0, "revision": 0, "layers": [layer], "layer_edges": []},
                            run="live", seq=next(seq), time=time.time()))
    labels = np.arange(12, dtype=np.int16) % 3

    def validate(step):
        recorder.submit(Message("val", {"step": step, "epoch": step // 10, "count": 12, "metrics": {}},
                                {"pred": labels.copy(), "label": labels}, run="live", seq=next(seq),
                                time=time.time()))

    def snapshot(step):
        weight = np.full((2, 1, 3, 3), step, np.float32)
        recorder.submit(Message("snapshot", {"step": step, "revision": 0, "layers": ["conv"]},
                                {"weight/conv": weight, "grad/conv": weight}, run="live", seq=next(seq),
                                time=time.time()))

    validate(10)
    snapshot(10)
    assert recorder.flush(10)
    hub = Hub([], logdir=str(tmp_path / "logs"), warm_umap=False)
    client = create_app(hub).server.test_client()
    deps = client.get("/_dash-dependencies").get_json()

    def call(output_part, inputs, state=(), changed=None):
        return dash_call(client, deps, output_part, inputs, state, changed)

    run = str(run_dir)

    def follow(live):
        out = call("ane-live.data", [("tick-explore", "data", [1, 0])],
                   [("ane-run", "value", run), ("ane-live", "data", live)])
        return out.get("ane-live", {}).get("data")

    def validations(live):
        out = call("ane-val-summary.children", [("ane-run", "value", run), ("ane-window", "value", 3),
                                                ("ane-threshold", "value", 5), ("ane-direction", "value", "backward"),
                                                ("ane-class", "value", 0), ("ane-pins", "data", []),
                                                ("ane-live", "data", live)], changed="ane-live.data")
        return out["ane-val-summary"]["children"]

    def snapshot_steps(live):
        out = call("anc-step-b.options", [("anc-run-b", "value", run), ("anc-live", "data", live)],
                   [("anc-step-b", "value", 10)], changed="anc-live.data")
        return [option["value"] for option in out["anc-step-b"]["options"]], out["anc-step-b"].get("value")

    first = follow(None)                                 # the page is shown: a first marker
    assert first is not None
    assert validations(first).startswith("1 validation samples × 12 images")
    assert follow(first) is None                         # nothing new: no refresh
    time.sleep(0.05)  # what is recorded next gets a later modification time than the marker saw
    validate(20)
    snapshot(20)
    assert recorder.flush(10)
    assert follow(first) is None                         # new data, but the last refresh was under 5 s ago
    stale = dict(first, at=first["at"] - LIVE_REFRESH_S)
    second = follow(stale)                               # new data and 5 s since: refresh
    assert second is not None and second["versions"] != first["versions"]
    assert validations(second).startswith("2 validation samples × 12 images")
    assert snapshot_steps(second) == ([10, 20], None)    # the new snapshot listed; the chosen step kept (not resent)
    recorder.close()
    hub.stop()


def test_tree_lists_nodes_in_the_order_their_names_first_appear():
    tree = build_tree(["a.x", "b.y", "a.z"])
    assert list(tree["nodes"]) == ["model", "a", "a.x", "b.y", "a.z"]       # "b" holds one node: collapsed
    assert tree["nodes"]["a"]["children"] == ["a.x", "a.z"] and tree["nodes"]["model"]["children"] == ["a", "b.y"]
