"""RunRecorder and the torch-free reader: round trip, downsampling, steering, live reads, SIGKILL, disk errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from revacnn.wire.protocol import FILTER_FIELDS, Message
from revacnn.recording import RunRecorder
from revacnn.recording.format import list_segments, read_segment
from revacnn.recording.reader import list_runs, open_run

from helpers import wait_for

RUN = "test-run"


def layer(name, ids):
    return {"name": name, "type": "Conv2d", "kind": "conv", "out": len(ids), "filter_ids": list(ids), "frozen": None}


def structure(seq, step, revision, layers):
    return Message("structure", {"step": step, "revision": revision, "model": "Demo", "layers": layers,
                                 "modules": [], "edges": [], "layer_edges": []}, run=RUN, seq=seq, time=1000.0 + seq)


def step_message(seq, step, layers, rng, per_filter=True, nan_every=0):
    body = {"step": step, "epoch": step // 100, "batch": step % 100, "loss": 1.0 / step,
            "metrics": {"train_acc": step / 1000.0},
            "groups": [{"lr": 0.1 / step, "momentum": 0.9, "weight_decay": 5e-4}, {"lr": 0.01, "momentum": None,
                                                                                  "weight_decay": 0.0}],
            "batch_size": 32, "samples_per_s": 1000.0 + step, "drops": {"telemetry": 0, "recording": 0},
            "per_filter": per_filter}
    arrays = {}
    if per_filter:
        width = sum(len(l["filter_ids"]) for l in layers)
        filters = rng.standard_normal((5, width)).astype(np.float32)
        if nan_every:
            filters[:, ::nan_every] = np.where(rng.random((5, len(range(0, width, nan_every)))) < 0.3, np.nan,
                                               filters[:, ::nan_every])
        body["filter_fields"] = list(FILTER_FIELDS)
        body["layer_names"] = [l["name"] for l in layers]
        arrays = {"filters": filters, "layers": rng.random(len(layers)).astype(np.float32)}
    return Message("step", body, arrays, run=RUN, seq=seq, time=1000.0 + seq)


def expected_columns(layers, filters):
    """Split a [5, F] filters buffer into {layer name: (ids, [5, out])}."""
    out, start = {}, 0
    for l in layers:
        ids = l["filter_ids"]
        out[l["name"]] = (list(ids), filters[:, start:start + len(ids)])
        start += len(ids)
    return out


DEMO = [layer("net.conv1", range(0, 16)), layer("net.conv2", range(16, 36)), layer("net.conv3", range(36, 56)),
        layer("net.fc", range(56, 66))]


def test_round_trip_everything(tmp_path):
    rng = np.random.default_rng(1)
    rec = RunRecorder(tmp_path / "run")
    seq = 1
    rec.submit(structure(seq, 0, 0, DEMO))
    seq += 1
    hp = {"step": 0, "groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}], "optimizer": "SGD",
          "batch_size": 32, "max_epochs": 3, "schedulers": []}
    rec.submit(Message("hparams", hp, run=RUN, seq=seq, time=1.0))
    sent_steps, sent_filter_steps, snapshots, vals, acks = [], [], {}, [], []
    for step in range(1, 61):
        seq += 1
        message = step_message(seq, step, DEMO, rng, per_filter=step % 3 == 0)
        assert rec.submit(message)
        sent_steps.append(message)
        if message.body["per_filter"]:
            sent_filter_steps.append(message)
        if step % 20 == 0:
            seq += 1
            arrays = {f"weight/{l['name']}": rng.standard_normal((len(l["filter_ids"]), 3, 5, 5)).astype(np.float32)
                      for l in DEMO}
            arrays["weight_stats"] = rng.standard_normal((4, 11)).astype(np.float32)
            snap = Message("snapshot", {"step": step, "epoch": 0, "revision": 0, "layer_names": [l["name"] for l in DEMO],
                                        "stat_fields": ["min"], "probe_labels": [1, 2]}, arrays, run=RUN, seq=seq,
                           time=float(step))
            rec.submit(snap)
            snapshots[step] = snap
        if step % 25 == 0:
            seq += 1
            pred = rng.integers(0, 10, 100).astype(np.int16)
            label = np.arange(100, dtype=np.int16) % 10
            val = Message("val", {"step": step, "epoch": 0, "metrics": {"val_loss": 2.0 / step, "val_acc": 0.5},
                                  "count": 100}, {"pred": pred, "label": label}, run=RUN, seq=seq, time=float(step))
            rec.submit(val)
            vals.append(val)
        if step in (10, 40):
            seq += 1
            ack = Message("ack", {"req": "r", "id": f"c{step}", "op": "pause" if step == 10 else "widen",
                                  "status": "done" if step == 10 else "error", "step": step,
                                  "error": None if step == 10 else "layer is frozen", "result": {"n": step}},
                          run=RUN, seq=seq, time=float(step))
            rec.submit(ack)
            acks.append(ack)
    seq += 1
    rec.submit(Message("status", {"state": "finished", "step": 60, "epoch": 0, "drops": {}, "queue": {},
                                  "world_size": 1, "message": "done"}, run=RUN, seq=seq, time=99.0))
    assert rec.flush(timeout=10)
    assert rec.error is None and rec.drops == 0

    run = open_run(tmp_path / "run")
    # structure and hparams history
    structures = run.structures()
    assert [s for s, _ in structures] == [0]
    assert [l["filter_ids"] for l in structures[0][1]["layers"]] == [l["filter_ids"] for l in DEMO]
    assert run.hparams() == [(0, hp)]
    # scalars: exactly what was sent
    scalars = run.scalars()
    np.testing.assert_array_equal(scalars["step"], [m.body["step"] for m in sent_steps])
    np.testing.assert_array_equal(scalars["loss"], [m.body["loss"] for m in sent_steps])
    np.testing.assert_array_equal(scalars["lr/0"], [m.body["groups"][0]["lr"] for m in sent_steps])
    np.testing.assert_array_equal(scalars["lr/1"], [0.01] * 60)
    assert np.isnan(scalars["momentum/1"]).all()
    np.testing.assert_array_equal(scalars["train_acc"], [m.body["metrics"]["train_acc"] for m in sent_steps])
    np.testing.assert_array_equal(scalars["samples_per_s"], [m.body["samples_per_s"] for m in sent_steps])
    np.testing.assert_array_equal(scalars["epoch"], [m.body["epoch"] for m in sent_steps])
    partial = run.scalars(start=10, stop=30, every=5)
    np.testing.assert_array_equal(partial["step"], [10, 15, 20, 25])
    frame = run.scalars_frame()
    assert list(frame["step"]) == list(range(1, 61))
    # per-filter series, every layer and field, exact
    for index, spec in enumerate(DEMO):
        for f, field in enumerate(FILTER_FIELDS):
            series = run.filter_series(spec["name"], field)
            assert "min" not in series
            np.testing.assert_array_equal(series["step"], [m.body["step"] for m in sent_filter_steps])
            np.testing.assert_array_equal(series["filter_ids"], spec["filter_ids"])
            expected = np.stack([expected_columns(DEMO, m.arrays["filters"])[spec["name"]][1][f]
                                 for m in sent_filter_steps])
            np.testing.assert_array_equal(series["values"], expected)
            assert series["values"].dtype == np.float32
        by_index = run.filter_series(index, "weight_norm", start=30, stop=45)
        np.testing.assert_array_equal(by_index["step"], [30, 33, 36, 39, 42])
    # per-layer series
    per_layer = run.layer_series("grad_weight_ratio")
    assert per_layer["layers"] == [l["name"] for l in DEMO]
    np.testing.assert_array_equal(per_layer["values"], np.stack([m.arrays["layers"] for m in sent_filter_steps]))
    # snapshots
    assert run.snapshot_steps() == [20, 40, 60]
    for step, message in snapshots.items():
        got = run.snapshot(step)
        assert got["body"] == message.body and got["seq"] == message.seq
        assert set(got["arrays"]) == set(message.arrays)
        for name, array in message.arrays.items():
            np.testing.assert_array_equal(got["arrays"][name], array)
    with pytest.raises(KeyError):
        run.snapshot(21)
    # validation
    val = run.val_predictions()
    np.testing.assert_array_equal(val["steps"], [25, 50])
    np.testing.assert_array_equal(val["pred"], np.stack([v.arrays["pred"] for v in vals]))
    assert val["pred"].dtype == np.int16
    np.testing.assert_array_equal(val["label"], vals[-1].arrays["label"])
    np.testing.assert_array_equal(val["metrics"]["val_loss"], [2.0 / 25, 2.0 / 50])
    # steering log and status
    log = run.steering_log()
    assert [(e["id"], e["op"], e["status"], e["step"], e["error"]) for e in log] == [
        ("c10", "pause", "done", 10, None), ("c40", "widen", "error", 40, "layer is frozen")]
    assert log[1]["result"] == {"n": 40}
    assert run.status()["state"] == "finished"
    rec.close()
    rec.close()   # idempotent
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] == RUN


def test_float16_filters(tmp_path):
    rng = np.random.default_rng(2)
    rec = RunRecorder(tmp_path / "run", float16_filters=True)
    rec.submit(structure(1, 0, 0, DEMO))
    sent = [step_message(i + 2, i + 1, DEMO, rng) for i in range(12)]
    for message in sent:
        rec.submit(message)
    rec.close()
    series = open_run(tmp_path / "run").filter_series("net.conv2", "grad_sq_mean")
    expected = np.stack([m.arrays["filters"][1, 16:36] for m in sent]).astype(np.float16).astype(np.float32)
    assert series["values"].dtype == np.float32
    np.testing.assert_array_equal(series["values"], expected)
    assert not np.array_equal(series["values"], np.stack([m.arrays["filters"][1, 16:36] for m in sent]))


def _buckets_expected(records, lo, hi):
    """Independent per-filter aggregate of the records with lo <= step <= hi: (count, nanmean, nanmin, nanmax)."""
    block = np.stack([v for s, v in records if lo <= s <= hi]).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return len(block), np.nanmean(block, 0), np.nanmin(block, 0), np.nanmax(block, 0)


def test_downsampling_pyramid_and_retention(tmp_path):
    rng = np.random.default_rng(3)
    layers = [layer("a", range(4)), layer("b", range(4, 7))]
    rec = RunRecorder(tmp_path / "run", full_records=40, keep_buckets=20, levels=3)
    rec.submit(structure(1, 0, 0, layers))
    records = []   # (step, weight_norm of layer a)
    n = 1234
    for i in range(n):
        step = 2 * (i + 1)
        message = step_message(i + 2, step, layers, rng, nan_every=3)
        rec.submit(message)
        records.append((step, message.arrays["filters"][2, :4].copy()))
        if i % 200 == 0:
            rec.flush()
    rec.close()
    run = open_run(tmp_path / "run")
    steps = [s for s, _ in records]
    # full resolution was retired for old records: the level-0 files hold at most full_records + one segment
    level0 = run.filter_table("a", 0)
    assert 40 <= level0.num_rows <= 40 + 50          # retired in whole segments of at least 50 rows
    assert level0.column("step").to_pylist() == steps[-level0.num_rows:]
    series = run.filter_series("a", "weight_norm")
    # rows partition the run: consecutive, non-overlapping, covering every record exactly once
    assert series["step"][0] == steps[0] and series["step_end"][-1] == steps[-1]
    np.testing.assert_array_equal(series["step"][1:], series["step_end"][:-1] + 2)
    assert series["count"].sum() == n
    assert series["count"].max() == 100 and series["count"][-1] == 1     # old: 100-record buckets; newest: raw
    assert len(series["step"]) < 150
    for row in range(len(series["step"])):
        count, mean, low, high = _buckets_expected(records, series["step"][row], series["step_end"][row])
        assert count == series["count"][row]
        np.testing.assert_allclose(series["values"][row], mean.astype(np.float32), rtol=1e-5, equal_nan=True)
        np.testing.assert_array_equal(series["min"][row], low.astype(np.float32))
        np.testing.assert_array_equal(series["max"][row], high.astype(np.float32))
    # a chosen resolution: at most that many rows, each an exact aggregate of its records
    for resolution in (7, 30, 60):
        coarse = run.filter_series("a", "weight_norm", resolution=resolution)
        assert 1 <= len(coarse["step"]) <= resolution
        assert coarse["count"].sum() == n
        for row in range(len(coarse["step"])):
            _, _, low, high = _buckets_expected(records, coarse["step"][row], coarse["step_end"][row])
            np.testing.assert_array_equal(coarse["min"][row], low.astype(np.float32))
            np.testing.assert_array_equal(coarse["max"][row], high.astype(np.float32))
    # a recent window is served at full resolution
    recent = run.filter_series("a", "weight_norm", start=steps[-20], resolution=100)
    assert "min" not in recent
    np.testing.assert_array_equal(recent["step"], steps[-20:])
    np.testing.assert_array_equal(recent["values"], np.stack([v for _, v in records[-20:]]))


def test_mean_of_rebucketed_rows(tmp_path):
    rng = np.random.default_rng(4)
    layers = [layer("a", range(3))]
    rec = RunRecorder(tmp_path / "run", levels=3)
    rec.submit(structure(1, 0, 0, layers))
    records = []
    for i in range(250):
        message = step_message(i + 2, i + 1, layers, rng)
        rec.submit(message)
        records.append((i + 1, message.arrays["filters"][0].copy()))
    rec.close()
    series = open_run(tmp_path / "run").filter_series("a", "grad_abs_mean", resolution=4)
    assert len(series["step"]) <= 4 and series["count"].sum() == 250
    for row in range(len(series["step"])):
        count, mean, low, high = _buckets_expected(records, series["step"][row], series["step_end"][row])
        assert count == series["count"][row]
        np.testing.assert_allclose(series["values"][row], mean, rtol=1e-5)
        np.testing.assert_array_equal(series["min"][row], low.astype(np.float32))


def test_steered_run_keeps_filter_ids(tmp_path):
    rng = np.random.default_rng(5)
    revisions = [DEMO,
                 [DEMO[0], layer("net.conv2", [*range(16, 36), 66]), DEMO[2], DEMO[3]],                # widened 20→21
                 [DEMO[0], layer("net.conv2", [i for i in [*range(16, 36), 66] if i not in (20, 25)]),  # removed 2
                  DEMO[2], DEMO[3]]]
    rec = RunRecorder(tmp_path / "run", full_records=20, keep_buckets=20, levels=3)
    seq, sent = 0, []
    for step in range(1, 91):
        if step in (1, 31, 61):
            seq += 1
            rec.submit(structure(seq, step - 1, (step - 1) // 30, revisions[(step - 1) // 30]))
        seq += 1
        current = revisions[(step - 1) // 30]
        message = step_message(seq, step, current, rng)
        rec.submit(message)
        ids, block = expected_columns(current, message.arrays["filters"])["net.conv2"]
        sent.append((step, dict(zip(ids, block.T))))
    rec.close()
    run = open_run(tmp_path / "run")
    assert [(s, len(b["layers"][1]["filter_ids"])) for s, b in run.structures()] == [(0, 20), (30, 21), (60, 19)]
    all_ids = [*range(16, 36), 66]
    series = run.filter_series("net.conv2", "update_ratio", start=0, stop=91)
    np.testing.assert_array_equal(series["filter_ids"], all_ids)

    def expected(lo, hi):
        rows = []
        for step, columns in sent:
            if lo <= step <= hi:
                rows.append([columns[fid][3] if fid in columns else np.nan for fid in all_ids])
        return np.asarray(rows, np.float64)

    ends = series.get("step_end", series["step"])
    for row, (lo, hi) in enumerate(zip(series["step"], ends)):
        block = expected(lo, hi)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            np.testing.assert_allclose(series["values"][row], np.nanmean(block, 0).astype(np.float32), rtol=1e-5)
            if "max" in series:
                np.testing.assert_array_equal(series["max"][row], np.nanmax(block, 0).astype(np.float32))
    # at full resolution (the last 20 records are kept raw): removed ids are NaN, kept ids exact
    recent = run.filter_series("net.conv2", "update_ratio", start=71)
    np.testing.assert_array_equal(recent["step"], range(71, 91))
    col = {fid: i for i, fid in enumerate(recent["filter_ids"])}
    assert 20 not in col or np.isnan(recent["values"][:, col[20]]).all()
    np.testing.assert_array_equal(recent["values"][:, col[66]], [sent[s - 1][1][66][3] for s in range(71, 91)])
    # a window that straddles the widening: id 66 is NaN before step 31 and present from it on
    window = run.filter_series("net.conv2", "update_ratio", start=25, stop=36)
    steps = window["step"]
    col = {fid: i for i, fid in enumerate(window["filter_ids"])}
    assert np.isnan(window["values"][steps < 21, col[66]]).all() if (steps < 21).any() else True
    raw = steps[window.get("count", np.ones(len(steps))) == 1]
    for step in raw:
        value = window["values"][list(steps).index(step), col[66]]
        assert np.isnan(value) == (step <= 30)


def _rename_ack(seq, step, old, new):
    result = {"structural": True, "changes": {"after": old, "anchor": old, "renamed": {old: new},
                                              "inserted": [old + ".2"]}, "filter_maps": {}, "revision": 1}
    return Message("ack", {"id": f"c{seq}", "op": "insert_layer", "status": "done", "step": step, "error": None,
                           "result": result}, run=RUN, seq=seq, time=1000.0 + seq)


def test_a_renamed_layer_has_one_series_across_the_rename(tmp_path):
    """insert_layer renames net.conv2 to net.conv2.0 (same filters, same ids): its series was split in two, the
    explorer listed both names, and the buckets around the change were cut short."""
    rng = np.random.default_rng(6)
    inserted = layer("net.conv2.2", range(66, 86))
    after = [DEMO[0], layer("net.conv2.0", range(16, 36)), inserted, DEMO[2], DEMO[3]]
    rec = RunRecorder(tmp_path / "run", full_records=20, keep_buckets=20, levels=3)
    seq, sent = 1, []
    rec.submit(structure(seq, 0, 0, DEMO))
    for step in range(1, 61):
        if step == 26:        # the command is applied before batch 26 (ack, new structure), then the steps go on
            rec.submit(_rename_ack(seq + 1, 25, "net.conv2", "net.conv2.0"))
            rec.submit(structure(seq + 2, 25, 1, after))
            seq += 2
        seq += 1
        current = DEMO if step < 26 else after
        message = step_message(seq, step, current, rng)
        rec.submit(message)
        name = "net.conv2" if step < 26 else "net.conv2.0"
        sent.append((step, expected_columns(current, message.arrays["filters"])[name][1][2].copy()))
    rec.close()
    run = open_run(tmp_path / "run")
    assert run.renames() == {"net.conv2.0": "net.conv2"}
    assert run.layer_names() == ["net.conv1", "net.conv2.0", "net.conv2.2", "net.conv3", "net.fc"]
    raw = run.filter_series("net.conv2.0", "weight_norm")
    assert raw["step"].tolist() == list(range(1, 61))
    np.testing.assert_array_equal(raw["values"], np.stack([v for _, v in sent]))
    series = run.filter_series("net.conv2.0", "weight_norm", resolution=6)     # the buckets of 10 records
    np.testing.assert_array_equal(series["filter_ids"], range(16, 36))
    assert series["step"][0] == 1 and series["step_end"][-1] == 60 and series["count"].sum() == 60
    for row in range(len(series["step"])):            # every bucket, those across step 26 too, is exact
        count, mean, low, high = _buckets_expected(sent, series["step"][row], series["step_end"][row])
        assert count == series["count"][row]
        np.testing.assert_allclose(series["values"][row], mean.astype(np.float32), rtol=1e-5)
        np.testing.assert_array_equal(series["max"][row], high.astype(np.float32))
    assert list(zip(series["step"][:3], series["step_end"][:3])) == [(1, 10), (11, 20), (21, 30)]
    per_layer = run.layer_series()
    assert per_layer["layers"] == run.layer_names()
    column = per_layer["values"][:, per_layer["layers"].index("net.conv2.0")]
    assert not np.isnan(column).any() and np.isnan(per_layer["values"][:25, 2]).all()

    # a resumed run (from a checkpoint at step 40) records into the same directory; its recorder never saw the
    # ack, so it writes under the new name: the reader joins both, the resumed timeline replacing steps 41-60
    resumed = RunRecorder(tmp_path / "run", full_records=20, keep_buckets=20, levels=3)
    resumed.submit(structure(100, 40, 1, after))
    for step in range(41, 71):
        message = step_message(100 + step, step, after, rng)
        resumed.submit(message)
        sent = [(s, v) for s, v in sent if s != step]
        sent.append((step, expected_columns(after, message.arrays["filters"])["net.conv2.0"][1][2].copy()))
    resumed.close()
    run = open_run(tmp_path / "run")
    assert run.layer_names() == ["net.conv1", "net.conv2.0", "net.conv2.2", "net.conv3", "net.fc"]
    recent = run.filter_series("net.conv2.0", "weight_norm", start=31)
    raw = recent["count"] == 1 if "count" in recent else np.ones(len(recent["step"]), bool)
    assert recent["step"][raw][-30:].tolist() == list(range(41, 71))
    for step, values in zip(recent["step"][raw], recent["values"][raw]):
        np.testing.assert_array_equal(values, dict(sent)[int(step)])


def test_buckets_stay_exact_when_each_record_is_flushed_alone_and_ids_change_inside_a_bucket(tmp_path):
    """A record per flush (a slow run) and widenings that fall inside a 10-record bucket: every bucket still
    aggregates exactly its records, each filter id over the records that had it."""
    rng = np.random.default_rng(8)
    revisions = {1: [layer("a", range(4))], 24: [layer("a", range(5))], 43: [layer("a", [0, 2, 3, 4])]}
    rec = RunRecorder(tmp_path / "run", levels=3)
    seq, sent, current = 0, [], None
    for step in range(1, 58):
        if step in revisions:
            seq += 1
            current = revisions[step]
            rec.submit(structure(seq, step - 1, list(revisions).index(step), current))
        seq += 1
        message = step_message(seq, step, current, rng)
        rec.submit(message)
        ids, block = expected_columns(current, message.arrays["filters"])["a"]
        sent.append((step, dict(zip(ids, block[2]))))
        assert rec.flush(timeout=10)
    rec.close()
    series = open_run(tmp_path / "run").filter_series("a", "weight_norm", start=0, stop=58, resolution=12)
    np.testing.assert_array_equal(series["filter_ids"], range(5))
    assert series["count"].sum() == 57 and series["count"].max() == 10
    for row, (lo, hi) in enumerate(zip(series["step"], series["step_end"])):
        block = np.array([[values.get(fid, np.nan) for fid in range(5)] for step, values in sent if lo <= step <= hi])
        assert len(block) == series["count"][row]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            np.testing.assert_allclose(series["values"][row], np.nanmean(block, 0).astype(np.float32), rtol=1e-5)
            np.testing.assert_array_equal(series["min"][row], np.nanmin(block, 0).astype(np.float32))
            np.testing.assert_array_equal(series["max"][row], np.nanmax(block, 0).astype(np.float32))


def _writer_thread(run_dir, n, layers, stop_event):
    rng = np.random.default_rng(6)
    rec = RunRecorder(run_dir, flush_interval=0.05)
    rec.submit(structure(1, 0, 0, layers))
    for i in range(n):
        rec.submit(step_message(i + 2, i + 1, layers, rng))
        time.sleep(0.002)  # paces the steps, so the reader meets the recording at many points of its growth
    rec.close()
    stop_event.set()


def test_read_while_written_grows_monotonically(tmp_path):
    layers = [layer("a", range(8)), layer("b", range(8, 12))]
    done = threading.Event()
    thread = threading.Thread(target=_writer_thread, args=(tmp_path / "run", 600, layers, done))
    thread.start()
    wait_for(lambda: (tmp_path / "run" / "run.json").exists(), timeout=60, interval=0.01)
    run = open_run(tmp_path / "run")
    seen_scalars, seen_filters, observations = 0, 0, 0
    while not done.is_set() or observations < 3:
        scalars = run.scalars()
        series = run.filter_series("a", "weight_norm")
        n, m = len(scalars["step"]), len(series["step"])
        assert n >= seen_scalars and m >= seen_filters
        np.testing.assert_array_equal(scalars["step"], np.arange(1, n + 1))
        np.testing.assert_array_equal(series["step"], np.arange(1, m + 1))
        if 0 < n < 600:
            observations += 1
        seen_scalars, seen_filters = n, m
        time.sleep(0.02)  # paces the reads: each sees the recording some steps further on
        if done.is_set():
            break
    thread.join()
    assert observations >= 3, "the reader never saw a partially written run"
    assert len(run.scalars()["step"]) == 600 and len(run.filter_series("b", "weight_norm")["step"]) == 600


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from revacnn.wire.protocol import Message
    from revacnn.recording import RunRecorder
    layers = [{"name": "c", "out": 6, "filter_ids": list(range(6))}, {"name": "f", "out": 3, "filter_ids": [6, 7, 8]}]
    rec = RunRecorder(sys.argv[1], full_records=200, keep_buckets=50, levels=3)
    rec.submit(Message("structure", {"step": 0, "revision": 0, "layers": layers}, run="k", seq=1, time=time.time()))
    step = 0
    while True:
        step += 1
        filters = (step + np.arange(45, dtype=np.float32).reshape(5, 9) / 100).astype(np.float32)
        rec.submit(Message("step", {"step": step, "loss": float(step), "per_filter": True,
                                    "layer_names": ["c", "f"], "filter_fields": ["a", "b", "c", "d", "e"]},
                           {"filters": filters, "layers": np.array([step, -step], np.float32)},
                           run="k", seq=step + 1, time=time.time()))
        if step % 25 == 0:
            rec.submit(Message("snapshot", {"step": step}, {"w": np.full((6, 3, 3, 3), step, np.float32)},
                               run="k", seq=step + 1, time=time.time()))
        print(step, time.time(), flush=True)
        time.sleep(0.004)   # ~200 steps/s, each with per-filter data (the callback's default is every 10th)
""")


@pytest.mark.parametrize("attempt", range(6))
def test_sigkill_reads_back(tmp_path, attempt):
    random.seed(attempt)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True)
    first = child.stdout.readline()            # the child is writing
    assert first.startswith("1 ")
    time.sleep(random.uniform(1.2, 2.5))      # killed at a random point of its writing, on purpose
    kill_time = time.time()
    os.kill(child.pid, signal.SIGKILL)
    rest = child.stdout.read()
    child.wait()
    # complete lines only: the kill can cut the child's last print short ("123" without its time)
    lines = [first] + rest.split("\n")[:-1]
    submitted = [(int(a), float(b)) for a, b in (line.split() for line in lines if line.strip())]
    due = max((s for s, t in submitted if t <= kill_time - 1.0), default=0)
    assert due > 0
    run = open_run(run_dir)
    steps = run.scalars()["step"]
    assert len(steps) >= due, f"only {len(steps)} of {due} steps due before the kill were recorded"
    np.testing.assert_array_equal(steps, np.arange(1, len(steps) + 1))
    np.testing.assert_array_equal(run.scalars()["loss"], steps.astype(float))
    series = run.filter_series("f", "c")             # field c = row 2, columns 6..8
    values = series["values"]
    if "count" in series:
        assert series["count"].sum() >= due
        raw = series["count"] == 1
        np.testing.assert_allclose(values[raw], series["step"][raw, None] + np.array([24, 25, 26]) / 100,
                                   rtol=1e-6)
    else:
        np.testing.assert_allclose(values, series["step"][:, None] + np.array([24, 25, 26]) / 100, rtol=1e-6)
    assert series["step_end"][-1] >= due if "step_end" in series else series["step"][-1] >= due
    per_layer = run.layer_series()
    np.testing.assert_array_equal(per_layer["values"][:, 0], per_layer["step"])
    for step in run.snapshot_steps():
        assert (run.snapshot(step)["arrays"]["w"] == step).all()
    assert max(run.snapshot_steps(), default=0) >= (due // 25) * 25


def test_truncated_segments_are_read_as_a_prefix(tmp_path):
    rng = np.random.default_rng(7)
    rec = RunRecorder(tmp_path / "run", flush_interval=0.01)
    rec.submit(structure(1, 0, 0, DEMO))
    for i in range(30):
        rec.submit(step_message(i + 2, i + 1, DEMO, rng))
        rec.flush()              # one batch per step
    (segment,) = list_segments(tmp_path / "run" / "filters" / "net.conv2" / "L0")
    data = segment.read_bytes()  # the segment being appended (a finished one may be re-packed into one batch)
    rec.close()
    segment = tmp_path / "copy.arrows"
    segment.write_bytes(data)
    _, table, clean = read_segment(segment)
    full = table.to_batches()
    assert clean and len(full) == 30 and table.num_rows == 30
    full_steps = [s for b in full for s in b.column("step").to_pylist()]
    cut = tmp_path / "cut" / "seg-000001.arrows"
    cut.parent.mkdir()
    for length in sorted(random.Random(0).sample(range(len(data)), 150)) + [len(data) - 1]:
        for tail in (b"", b"\0" * 64, b"\xff" * 3):
            cut.write_bytes(data[:length] + tail)
            _, table, _ = read_segment(cut)
            batches = [] if table is None else table.to_batches()
            steps = [] if table is None else table.column("step").to_pylist()
            assert steps == full_steps[:len(steps)]
            for batch, original in zip(batches, full):
                assert batch.equals(original)


def test_slow_run_segments_are_repacked_and_read_the_same(tmp_path):
    """One flush per record (a slow run) makes one batch per row; a finished segment is re-packed into one batch,
    atomically, and a reader that had it cached reads the same rows afterwards."""
    rng = np.random.default_rng(12)
    layers = [layer("a", range(5))]
    rec = RunRecorder(tmp_path / "run", full_records=200, levels=2)      # level-0 segments of 50 rows
    rec.submit(structure(1, 0, 0, layers))
    sent = []
    run = None
    for i in range(120):
        message = step_message(i + 2, i + 1, layers, rng)
        rec.submit(message)
        sent.append(message.arrays["filters"][4].copy())
        rec.flush()
        if i == 30:
            run = open_run(tmp_path / "run")
            assert len(run.filter_series("a", "act_abs_mean")["step"]) == 31
    rec.close()
    segments = list_segments(tmp_path / "run" / "filters" / "a" / "L0")
    assert len(segments) == 3
    batches = [len(read_segment(path)[1].to_batches()) for path in segments]
    assert batches == [1, 1, 1]
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]
    series = run.filter_series("a", "act_abs_mean")
    np.testing.assert_array_equal(series["step"], np.arange(1, 121))
    np.testing.assert_array_equal(series["values"], np.stack(sent))


def test_directory_removed_sets_error_without_raising(tmp_path):
    rng = np.random.default_rng(8)
    run_dir = tmp_path / "run"
    rec = RunRecorder(run_dir, flush_interval=0.02)
    rec.submit(structure(1, 0, 0, DEMO))
    for i in range(5):
        assert rec.submit(step_message(i + 2, i + 1, DEMO, rng))
    assert rec.flush(timeout=5) and rec.error is None
    shutil.rmtree(run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(5, 40):
            rec.submit(step_message(i + 2, i + 1, DEMO, rng))
            time.sleep(0.005)  # paces the steps over several flushes, each meeting the vanished directory
        assert rec.flush(timeout=5)
        after = [rec.submit(step_message(i + 2, i + 1, DEMO, rng)) for i in range(40, 45)]
        rec.close()
    assert rec.error is not None and "vanished" in rec.error
    assert after == [False] * 5
    assert rec.drops >= 5
    assert sum("recording" in str(w.message) for w in caught) == 1
    assert not run_dir.exists()


def test_write_error_on_full_disk_is_contained(tmp_path, monkeypatch):
    """A failing write (ENOSPC simulated) stops recording cleanly; what was written before stays readable."""
    rng = np.random.default_rng(9)
    rec = RunRecorder(tmp_path / "run", flush_interval=0.02)
    rec.submit(structure(1, 0, 0, DEMO))
    for i in range(10):
        rec.submit(step_message(i + 2, i + 1, DEMO, rng))
    assert rec.flush(timeout=5)
    import revacnn.recording.stream as stream

    def full(self, batch):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream.SegmentStream, "append", full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(10, 20):
            rec.submit(step_message(i + 2, i + 1, DEMO, rng))
        rec.flush(timeout=5)
        rec.close()
    assert "No space left" in rec.error
    run = open_run(tmp_path / "run")
    np.testing.assert_array_equal(run.scalars()["step"], np.arange(1, 11))
    assert len(run.filter_series("net.fc", "weight_norm")["step"]) == 10


def test_malformed_messages_do_not_stop_recording(tmp_path):
    rng = np.random.default_rng(13)
    rec = RunRecorder(tmp_path / "run")
    rec.submit(structure(1, 0, 0, DEMO))
    good = step_message(2, 1, DEMO, rng)
    odd = step_message(3, 2, DEMO, rng)
    odd.body["metrics"] = {"train_acc": "n/a"}              # not a number: recorded as NaN
    odd.arrays["filters"] = odd.arrays["filters"][:, :-1]   # width does not match the structure: not recorded
    broken = step_message(4, 3, DEMO, rng)
    broken.arrays["filters"] = object()                     # not an array at all: the message is skipped
    later = step_message(5, 4, DEMO, rng)
    for message in (good, odd, broken, later):
        rec.submit(message)
    rec.close()
    assert rec.error is None and rec.drops == 1
    run = open_run(tmp_path / "run")
    scalars = run.scalars()
    np.testing.assert_array_equal(scalars["step"], [1, 2, 4])
    assert np.isnan(scalars["train_acc"][1]) and scalars["train_acc"][0] == good.body["metrics"]["train_acc"]
    series = run.filter_series("net.fc", "weight_norm")
    np.testing.assert_array_equal(series["step"], [1, 4])
    np.testing.assert_array_equal(series["values"][1], later.arrays["filters"][2, 56:66])


def test_step_arrays_follow_their_structure_revision(tmp_path):
    """A step measured before a structural change but recorded after it is split by its own revision's ids."""
    rng = np.random.default_rng(14)
    before = [layer("a", [0, 1, 2]), layer("b", [3, 4])]
    after = [layer("a", [0, 2]), layer("b", [3, 4, 9])]
    rec = RunRecorder(tmp_path / "run")
    rec.submit(structure(1, 0, 0, before))
    rec.submit(structure(2, 5, 1, after))
    old = step_message(3, 5, before, rng)
    old.body["revision"] = 0
    new = step_message(4, 6, after, rng)
    new.body["revision"] = 1
    rec.submit(old)
    rec.submit(new)
    rec.close()
    run = open_run(tmp_path / "run")
    series = run.filter_series("b", "grad_abs_mean")
    np.testing.assert_array_equal(series["filter_ids"], [3, 4, 9])
    np.testing.assert_array_equal(series["values"][0], [*old.arrays["filters"][0, 3:5], np.nan])
    np.testing.assert_array_equal(series["values"][1], new.arrays["filters"][0, 2:5])
    np.testing.assert_array_equal(run.scalars()["revision"], [0, 1])


def test_full_queue_counts_drops(tmp_path):
    rng = np.random.default_rng(10)
    rec = RunRecorder(tmp_path / "run", queue_size=3)
    rec.submit(structure(1, 0, 0, DEMO))
    accepted = [rec.submit(step_message(i + 2, i + 1, DEMO, rng)) for i in range(300)]
    rec.close()
    assert rec.drops == accepted.count(False)
    steps = open_run(tmp_path / "run").scalars()["step"]
    np.testing.assert_array_equal(steps, [i + 1 for i, ok in enumerate(accepted) if ok])


def test_list_runs_finds_nested_runs(tmp_path):
    rng = np.random.default_rng(11)
    finished = RunRecorder(tmp_path / "lightning_logs" / "version_0" / "revacnn")
    finished.submit(structure(1, 0, 0, DEMO))
    finished.submit(step_message(2, 7, DEMO, rng))
    finished.submit(Message("status", {"state": "finished", "step": 7}, run="first", seq=3, time=1.0))
    finished.close()
    time.sleep(0.01)  # the live run's files get a later modification time
    live = RunRecorder(tmp_path / "lightning_logs" / "version_1" / "revacnn")
    live.submit(Message("status", {"state": "running", "step": 3}, run="second", seq=1, time=2.0))
    live.submit(step_message(2, 3, DEMO, rng))
    live.flush()
    (tmp_path / "lightning_logs" / "version_2").mkdir()
    (tmp_path / "lightning_logs" / "version_2" / "run.json").write_text('{"format": "something else"}')
    runs = list_runs(tmp_path)
    assert [Path(r["path"]).parent.name for r in runs] == ["version_0", "version_1"]
    assert [r["last_step"] for r in runs] == [7, 3]
    assert [(r["finished"], r["live"], r["state"]) for r in runs] == [(True, False, "finished"),
                                                                       (False, True, "running")]
    assert runs[1]["run_id"] == "second"
    live.close()
    assert list_runs(tmp_path)[1]["finished"] is True      # closed recorder, even without a final status


def test_no_torch_import():
    code = ("import sys; import revacnn.recording, revacnn.recording.reader, revacnn.recording.writer; "
            "from revacnn.recording import RunRecorder, open_run, list_runs; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_writer_wakes_per_interval_and_early_for_large_backlogs_and_flush(tmp_path, monkeypatch):
    """The writer thread wakes once per flush_interval, not per message; ``flush`` and a large backlog wake it."""
    from revacnn.recording import writer

    rng = np.random.default_rng(5)
    rec = RunRecorder(tmp_path / "run", flush_interval=60)
    try:
        rec.submit(structure(1, 0, 0, DEMO))
        rec.submit(step_message(2, 1, DEMO, rng))
        time.sleep(0.5)  # time in which nothing may happen: there is no condition to wait for
        assert rec.queue_length == 2           # still waiting for the 60 s interval
        assert rec.flush(timeout=5)
        assert rec.queue_length == 0
        assert list(open_run(tmp_path / "run").scalars()["step"]) == [1]
        monkeypatch.setattr(writer, "_EARLY_FLUSH_BYTES", 1000)   # a per-filter step message carries ~1.6 kB
        rec.submit(step_message(3, 2, DEMO, rng))
        wait_for(lambda: list(open_run(tmp_path / "run").scalars()["step"]) == [1, 2], timeout=5, interval=0.05)
        assert list(open_run(tmp_path / "run").scalars()["step"]) == [1, 2]
    finally:
        rec.close()


def test_steps_batches_become_one_scalar_row_per_step(tmp_path):
    """A ``steps`` message's rows land in the scalars stream like ``step`` bodies, in order, each with its own time."""
    layers = [layer("conv1", [0, 1, 2])]
    rec = RunRecorder(tmp_path / "run")
    rec.submit(structure(1, 0, 0, layers))
    rows = [{key: value for key, value in step_message(0, step, layers, None, per_filter=False).body.items()
             if key not in ("drops", "per_filter")} | {"time": 500.0 + step} for step in (1, 2, 3)]
    rows[1]["metrics"] = {"train_acc": None, "rare": 7.0}
    rec.submit(Message("steps", {"first": 1, "last": 3, "rows": rows, "drops": {"telemetry": 4, "recording": 1}},
                       run=RUN, seq=2, time=2000.0))
    rec.submit(step_message(3, 4, layers, np.random.default_rng(0)))
    rec.close()
    scalars = open_run(tmp_path / "run").scalars()
    np.testing.assert_array_equal(scalars["step"], [1, 2, 3, 4])
    np.testing.assert_array_equal(scalars["time"], [501.0, 502.0, 503.0, 1003.0])
    np.testing.assert_array_equal(scalars["seq"], [2, 2, 2, 3])
    np.testing.assert_allclose(scalars["loss"], [1.0, 0.5, 1 / 3, 0.25])
    np.testing.assert_allclose(scalars["lr/0"], [0.1, 0.05, 0.1 / 3, 0.025])
    np.testing.assert_allclose(scalars["train_acc"], [0.001, np.nan, 0.003, 0.004])
    np.testing.assert_allclose(scalars["rare"], [np.nan, 7.0, np.nan, np.nan])
    np.testing.assert_array_equal(scalars["drops_telemetry"], [4, 4, 4, 0])
    np.testing.assert_array_equal(scalars["per_filter"], [False, False, False, True])
