"""The recording's disk budget: it holds under ResNet-50-wide per-filter data and many snapshots, drops in the
documented order and says so in run.json, never goes closer to a full disk than ``min_free``, and bounds the
recorder's memory; snapshots stored as float16/bfloat16 read back as float32 within their precision."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.recording import RunRecorder, budget
from revacnn.recording.budget import dir_bytes, parse_bytes, pyramid_keeps
from revacnn.recording.reader import open_run
from revacnn.recording.retention import drop_order, log_spaced, retained
from revacnn.recording.run_writer import RunWriter
from revacnn.recording.snapshots import from_bfloat16_bits, to_bfloat16_bits
from revacnn.wire.protocol import FILTER_FIELDS, Message

from helpers import quiet_trainer
from test_recording import layer, step_message, structure

# ResNet-50's 26,570 monitored filters (tests/zoo.py's ResNet-50), in four layers of its widths
WIDE = [layer("stem", range(0, 64)), layer("mid", range(64, 64 + 10218)),
        layer("late", range(10282, 10282 + 14240)), layer("head", range(24522, 24522 + 2048))]
assert sum(len(l["filter_ids"]) for l in WIDE) == 26570


def snapshot_message(seq, step, size_mb=8.0):
    """A snapshot whose weight and gradient hold the step (so a file read back names the snapshot it came from)."""
    n = int(size_mb * (1 << 20) / 8)
    return Message("snapshot", {"step": step, "epoch": 0, "revision": 0, "layer_names": ["w"]},
                   {"weight/w": np.full(n, step, np.float32), "grad/w": np.full(n, -step, np.float32),
                    "cosine/w": np.ones(4, np.float32)}, run="budget", seq=seq, time=1000.0 + seq)


def feed(rec, steps, filters_every, snapshot_every, rng, layers=WIDE, check=None):
    """Steps with scalars every step, per-filter data every ``filters_every``, a snapshot every ``snapshot_every``;
    ``check`` is called after each flush (every 20 per-filter records)."""
    rec.submit(structure(1, 0, 0, layers))
    seq, filter_steps, snapshot_steps = 1, [], []
    for step in range(1, steps + 1):
        seq += 1
        per_filter = step % filters_every == 0
        rec.submit(step_message(seq, step, layers, rng, per_filter=per_filter))
        filter_steps += [step] if per_filter else []
        if step % snapshot_every == 0:
            seq += 1
            rec.submit(snapshot_message(seq, step))
            snapshot_steps.append(step)
        if per_filter and len(filter_steps) % 20 == 0:
            rec.flush()
            if check:
                check(step)
    return filter_steps, snapshot_steps


def test_budget_holds_with_the_newest_and_first_snapshots_and_every_record_covered(tmp_path):
    """150 MB for a run with 106 MB of raw ResNet-50-wide per-filter records and 20 snapshots of 8 MB: the
    directory never passes the budget, the newest snapshot and log-spaced older ones remain, and run.json lists
    exactly the snapshots that are gone."""
    rng = np.random.default_rng(0)
    limit = 150_000_000
    run_dir = tmp_path / "run"
    rec = RunRecorder(run_dir, disk_budget="150MB", disk_min_free=0)
    sizes = []
    filter_steps, snapshot_steps = feed(rec, 2000, 10, 100, rng, check=lambda step: sizes.append(dir_bytes(run_dir)))
    rec.close()
    assert rec.error is None and rec.drops == 0
    assert max(sizes) <= limit and dir_bytes(run_dir) <= limit
    run = open_run(run_dir)
    kept = run.snapshot_steps()
    dropped = run.dropped()
    assert kept[-1] == snapshot_steps[-1]                                   # the newest stays
    assert kept[0] == snapshot_steps[0] and len(kept) >= 3                  # the first goes last
    assert sorted(entry["step"] for entry in dropped["snapshots"]) == sorted(set(snapshot_steps) - set(kept))
    assert {entry["reason"] for entry in dropped["snapshots"]} == {"budget"}
    # the pyramid passed half the budget and was sized to it: level 0 keeps fewer than 2,000 records
    keep0 = run.disk()["filter_keep"][0]
    assert 20 <= keep0 < 2000 and run.info["disk"]["used"] <= limit
    # every remaining snapshot reads back as it was sent
    for step in kept:
        arrays = run.snapshot(step)["arrays"]
        assert (arrays["weight/w"] == step).all() and (arrays["grad/w"] == -step).all()
    # every per-filter record is still covered, the newest at full resolution; scalars of every step are there
    assert run.scalars()["step"].tolist() == list(range(1, 2001))
    for name in ("stem", "head"):
        series = run.filter_series(name, "grad_sq_mean")
        assert series["count"].sum() == len(filter_steps)
        assert series["step"][-1] == filter_steps[-1] and series["count"][-1] == 1
    assert not dropped["filter_steps"]


def test_free_space_guard_stops_per_filter_data_and_snapshots_but_not_scalars(tmp_path, monkeypatch):
    """A filesystem of 40 MB (simulated: free space = 40 MB − what the run holds), min_free 10 MB, no budget: the
    run never holds more than 30 MB; snapshots go first, then per-filter data is dropped, scalars never."""
    run_dir = tmp_path / "run"
    capacity, min_free = 40_000_000, 10_000_000
    monkeypatch.setattr(budget, "free_bytes", lambda path: max(0, capacity - dir_bytes(run_dir)))
    rng = np.random.default_rng(1)
    rec = RunRecorder(run_dir, disk_budget=None, disk_min_free=min_free)
    sizes = []
    filter_steps, snapshot_steps = feed(rec, 1500, 10, 100, rng, check=lambda step: sizes.append(dir_bytes(run_dir)))
    rec.close()
    assert rec.error is None
    assert max(sizes) <= capacity - min_free and dir_bytes(run_dir) <= capacity - min_free
    run = open_run(run_dir)
    dropped = run.dropped()
    assert dropped["filter_steps"] and {e["reason"] for e in dropped["filter_steps"]} == {"free space"}
    assert {e["reason"] for e in dropped["snapshots"] + dropped["snapshots_not_written"]} == {"free space"}
    assert run.disk()["limited_by"] == "free space"
    # the per-filter records written plus those listed as dropped are every record sent
    not_written = sum(e["count"] for e in dropped["filter_steps"])
    series = run.filter_series("head", "weight_norm")
    assert series.get("count", np.ones(len(series["step"]))).sum() + not_written == len(filter_steps)
    assert not_written < len(filter_steps)
    assert run.scalars()["step"].tolist() == list(range(1, 1501))
    on_disk = set(run.snapshot_steps())
    gone = {e["step"] for e in dropped["snapshots"]} | {e["step"] for e in dropped["snapshots_not_written"]}
    assert on_disk | gone == set(snapshot_steps) and not on_disk & gone


def test_snapshot_keep_policies(tmp_path):
    rng = np.random.default_rng(2)
    small = [layer("a", range(4))]
    for policy, expected in ((2, [900, 1000]), (lambda steps: [s for s in steps if s % 300 == 0], [300, 600, 900])):
        run_dir = tmp_path / f"run-{expected[0]}"
        rec = RunRecorder(run_dir, snapshot_keep=policy)
        _, sent = feed(rec, 1000, 10, 100, rng, layers=small)
        rec.close()
        run = open_run(run_dir)
        assert run.snapshot_steps() == expected
        assert sorted(e["step"] for e in run.dropped()["snapshots"]) == sorted(set(sent) - set(expected))
        assert {e["reason"] for e in run.dropped()["snapshots"]} == {"snapshot_keep"}
    with pytest.raises(ValueError):
        RunRecorder(tmp_path / "bad", snapshot_keep=0)


def test_a_snapshot_larger_than_the_budget_is_not_written_and_drops_nothing(tmp_path):
    rec = RunRecorder(tmp_path / "run", disk_budget="30MB", disk_min_free=0)
    rec.submit(structure(1, 0, 0, [layer("a", range(4))]))
    for seq, step, size in ((2, 100, 8.0), (3, 200, 8.0), (4, 300, 40.0), (5, 400, 8.0)):
        rec.submit(snapshot_message(seq, step, size))
    rec.close()
    run = open_run(tmp_path / "run")
    assert run.snapshot_steps() == [100, 200, 400]
    assert [(e["step"], e["reason"]) for e in run.dropped()["snapshots_not_written"]] == [(300, "budget")]
    assert run.dropped()["snapshots"] == []
    assert dir_bytes(tmp_path / "run") <= 30_000_000


@pytest.mark.parametrize("dtype, unit_roundoff", [("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)])
def test_half_precision_snapshots_read_back_as_float32(tmp_path, dtype, unit_roundoff):
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((64, 32, 3, 3)) * 10.0 ** rng.uniform(-4, 2, (64, 1, 1, 1))).astype(np.float32)
    grad = (rng.standard_normal((64, 32, 3, 3)) * 1e-3).astype(np.float32)
    exact = rng.standard_normal(64).astype(np.float32)
    rec = RunRecorder(tmp_path / "run", snapshot_dtype=dtype)
    rec.submit(Message("snapshot", {"step": 5}, {"weight/c": weight, "grad/c": grad, "cosine/c": exact},
                       run="r", seq=1, time=1.0))
    rec.close()
    run = open_run(tmp_path / "run")
    got = run.snapshot(5)
    arrays = got["arrays"]
    assert got["stored_dtype"] == dtype
    assert {key: a.dtype for key, a in arrays.items()} == {"weight/c": np.float32, "grad/c": np.float32,
                                                          "cosine/c": np.float32}
    np.testing.assert_array_equal(arrays["cosine/c"], exact)        # other buffers keep float32
    for name, sent in (("weight/c", weight), ("grad/c", grad)):
        assert arrays[name].shape == sent.shape
        # rounding to nearest: relative error at most the unit roundoff where the format is normal (float16: from
        # 2^-14 ≈ 6.1e-5 on; below, its subnormals are 2^-24 apart: absolute error at most 2^-25)
        error = np.abs(arrays[name].astype(np.float64) - sent)
        normal = np.abs(sent) >= (2.0 ** -14 if dtype == "float16" else 2.0 ** -126)
        assert normal.any() and (dtype == "bfloat16" or not normal.all())      # both ranges are exercised
        assert np.all(error[normal] <= unit_roundoff * np.abs(sent[normal]))
        assert np.all(error[~normal] <= 2.0 ** -25)
        assert not np.array_equal(arrays[name], sent)
    # the file is plain safetensors: its header names the stored dtype
    path = next((tmp_path / "run" / "snapshots").glob("*.safetensors"))
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["weight/c"]["dtype"] == {"float16": "F16", "bfloat16": "BF16"}[dtype]
    assert header["cosine/c"]["dtype"] == "F32"
    if dtype == "float16":
        from safetensors.numpy import load_file

        np.testing.assert_array_equal(load_file(str(path))["weight/c"], weight.astype(np.float16))


def test_bfloat16_rounds_to_nearest_even_and_keeps_specials():
    values = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 3e38, np.inf, -np.inf, np.nan, 1e-40, 0.0],
                      np.float32)
    back = from_bfloat16_bits(to_bfloat16_bits(values))
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1); 1 + 3·2^-8 goes up to 1 + 2^-6
    expected = np.array([1.0, 1.0, 1.0 + 2 ** -6, -2.5], np.float32)
    np.testing.assert_array_equal(back[:4], expected)
    assert abs(back[4] - 3e38) <= 2 ** -8 * 3e38
    assert back[5] == np.inf and back[6] == -np.inf and np.isnan(back[7])
    assert 0 < back[8] and back[9] == 0


def test_inbox_is_bounded_in_bytes_and_keeps_the_scalars(tmp_path, monkeypatch):
    """While the writer is stuck, 40 steps of ResNet-50-wide per-filter data (0.53 MB each) against an 8 MB
    inbox: no more than 8 MB and one message of buffers wait; the others keep their scalars, and run.json names their
    steps."""
    release = threading.Event()
    original = RunWriter.handle

    def slow_handle(self, message, arrays_dropped=False):
        release.wait(30)
        return original(self, message, arrays_dropped)

    monkeypatch.setattr(RunWriter, "handle", slow_handle)
    rng = np.random.default_rng(4)
    rec = RunRecorder(tmp_path / "run", max_inbox_bytes=8 << 20)
    rec.submit(structure(1, 0, 0, WIDE))
    for step in range(1, 41):
        message = step_message(step + 1, step, WIDE, rng)
        rec.submit(message)
        assert rec._inbox_bytes < (8 << 20) + sum(a.nbytes for a in message.arrays.values())
    release.set()
    rec.close()
    run = open_run(tmp_path / "run")
    assert run.scalars()["step"].tolist() == list(range(1, 41))
    written = run.filter_series("head", "weight_norm")["step"].tolist()
    dropped = run.dropped()["filter_steps"]
    dropped_steps = [s for e in dropped for s in range(e["first"], e["last"] + 1)]
    assert {e["reason"] for e in dropped} == {"backlog"} and sum(e["count"] for e in dropped) == rec.drops
    assert sorted(written + dropped_steps) == list(range(1, 41)) and len(written) <= 17


def test_retention_rules():
    steps = list(range(500, 10001, 500))
    # recent: 9000, 9500, 10000; older, by power-of-two band of age (10000 − step): the oldest of each band
    assert log_spaced(steps) == {9000, 9500, 10000, 8000, 6000, 2000, 500}
    assert drop_order([100, 200, 300, 400], {100, 300, 400}) == [200, 300, 100]
    assert retained([1, 2, 3], 2) == {2, 3}
    assert parse_bytes("1GB") == 10 ** 9 and parse_bytes("1.5 GiB") == 3 << 29 and parse_bytes(None) is None
    with pytest.raises(ValueError):
        parse_bytes("a lot")
    # the pyramid plan: level 0 gets half the share, each bucket level below the coarsest a third of the rest
    keeps = pyramid_keeps(531_000, 500_000_000, 5, (2000, 1000, 1000, 1000, 1000))
    assert keeps[0] == int(250_000_000 / 531_000 / 1.25) and keeps[4] == 1000
    assert keeps[1:4] == (int(250_000_000 / 3 / (3 * 531_000) / 1.25),) * 3 == (41, 41, 41)
    assert pyramid_keeps(1000, 500_000_000, 5, (2000, 1000, 1000, 1000, 1000)) == (2000, 1000, 1000, 1000, 1000)
    assert len(FILTER_FIELDS) == 5


def test_the_callback_gives_its_disk_arguments_to_the_recording(tmp_path):
    import torch

    torch.manual_seed(0)
    with pytest.raises(ValueError):
        ReVACNNCallback(disk_budget="a lot")
    with pytest.raises(ValueError):
        ReVACNNCallback(snapshot_dtype="int8")
    callback = ReVACNNCallback(snapshot_every=3, snapshot_keep=2, snapshot_dtype="bfloat16", disk_budget="200MB",
                               disk_min_free="10MB", run_dir=tmp_path / "run")
    module = ClassifierModule(ReVACNNNet(), lr=0.05)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=12, limit_val_batches=2, callbacks=[callback],
                            default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    run = open_run(callback.run_dir)
    assert run.snapshot_steps() == [9, 12]
    events = run.table("events").to_pylist()
    sent = [row["step"] for row in events if row["type"] == "snapshot"]
    assert {3, 6, 9, 12} <= set(sent)
    assert [e["step"] for e in run.dropped()["snapshots"]] == sorted(set(sent) - {9, 12})
    last = run.snapshot(12)
    assert last["stored_dtype"] == "bfloat16"
    final = module.net.conv1.weight.detach().numpy()            # the last step's weights are the snapshot's
    np.testing.assert_array_equal(last["arrays"]["weight/net.conv1"], from_bfloat16_bits(to_bfloat16_bits(final)))
    assert run.disk()["budget"] == 200_000_000 and run.disk()["min_free"] == 10_000_000
    assert run.status()["disk"]["budget"] == 200_000_000         # the heartbeat carries it, and so the recording


def test_between_walks_the_keeper_counts_what_was_written_and_walks_before_anything_is_dropped(tmp_path):
    """``used`` between walks of the run directory is the last walk plus each write-out's upper bound; when that
    estimate says something would not fit, the directory is walked again, so an overestimate drops nothing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keeper = budget.DiskKeeper(run_dir, 10_000_000, 0, None, (100, 100), lambda keeps: None)
    keeper.measure()
    assert keeper.used == 0
    (run_dir / "a.bin").write_bytes(b"\0" * 3_000_000)
    keeper.wrote(4_000_000, 0)               # the write-out's bound, above what it wrote
    keeper.refresh(1_000_000)                # fits by the estimate: no walk, the estimate stands
    assert keeper.used == 4_000_000
    (run_dir / "a.bin").unlink()
    keeper.wrote(4_000_000, 0)               # 8 MB by the estimate, nothing on disk
    keeper.refresh(5_000_000)                # would not fit by the estimate: walked, and it fits
    assert keeper.used == 0
    assert keeper.make_room(5_000_000, False)
    assert not any(keeper.dropped.values())
    (run_dir / "b.bin").write_bytes(b"\0" * 9_000_000)   # written by someone else: found at the next walk
    keeper.refresh(5_000_000)
    assert keeper.used == 0                   # not due yet, and the estimate fits
    keeper._walked_at -= budget.WALK_EVERY
    keeper.refresh(5_000_000)
    assert keeper.used == 9_000_000 and not keeper.make_room(5_000_000, False)
