"""StepBatch: when a batch of steps is published, and what its rows hold (docs/protocol.md, ``steps``)."""

from __future__ import annotations

import math

import torch

from revacnn.telemetry.scalars import StepBatch


def _batch(**kwargs):
    published = []
    batch = StepBatch(published.append, lambda: {"telemetry": 2, "recording": 0}, **kwargs)
    return batch, published


def _row(step):
    return {"step": step, "epoch": 0, "batch": step - 1, "revision": 0, "groups": [{"lr": 0.1}], "batch_size": 4,
            "samples_per_s": 10.0, "time": 1000.0 + step}


def _rows(published):
    messages = [pending.resolve() for pending in published]
    assert all(m.type == "steps" for m in messages)
    return [[row["step"] for row in m.body["rows"]] for m in messages], messages


def test_a_batch_closes_after_the_interval_or_at_max_rows_and_never_twice():
    batch, published = _batch(interval=0.1, max_rows=3)
    batch.add(_row(1), [], now=0.0)      # the first step goes at once (nothing was sent yet)
    batch.add(_row(2), [], now=0.01)
    batch.add(_row(3), [], now=0.05)
    assert len(published) == 1 and len(batch) == 2
    batch.add(_row(4), [], now=0.11)     # 0.11 s since the last batch
    batch.add(_row(5), [], now=0.15)
    batch.add(_row(6), [], now=0.16)
    batch.add(_row(7), [], now=0.17)     # three rows held: full
    assert len(published) == 3 and len(batch) == 0
    batch.flush(now=0.18)                # nothing held: nothing sent, but the interval restarts
    batch.add(_row(8), [], now=0.25)
    assert len(published) == 3 and len(batch) == 1
    steps, messages = _rows(published)
    assert steps == [[1], [2, 3, 4], [5, 6, 7]]
    assert [(m.body["first"], m.body["last"]) for m in messages] == [(1, 1), (2, 4), (5, 7)]


def test_rows_keep_their_own_values_read_at_their_step():
    batch, published = _batch(interval=10.0, max_rows=100)
    loss = torch.tensor(0.0)
    for step in (1, 2, 3):
        loss = loss + 0.5                                 # a new tensor each step, as a training step's loss is
        values = [("loss", loss), ("train_acc", torch.tensor([step / 4])), ("lr_scale", step)]
        if step == 2:
            values.append(("rare", torch.tensor(math.nan)))   # logged on one step only; NaN travels as None
        if step == 3:
            values[0] = ("loss", torch.tensor(math.inf))      # named in the row's not_finite
        batch.add(_row(step), values, now=0.0 if step == 1 else 1.0)
    values[1][1].add_(100.0)                              # changing a tensor later does not change what was read
    batch.flush()
    steps, messages = _rows(published)
    assert steps == [[1], [2, 3]]
    rows = [row for m in messages for row in m.body["rows"]]
    assert [row["loss"] for row in rows] == [0.5, 1.0, None]
    assert [row.get("not_finite") for row in rows] == [None, ["rare"], ["loss"]]
    assert [row["metrics"] for row in rows] == [{"train_acc": 0.25, "lr_scale": 1.0},
                                                {"train_acc": 0.5, "lr_scale": 2.0, "rare": None},
                                                {"train_acc": 0.75, "lr_scale": 3.0}]
    assert rows[1]["time"] == 1002.0 and rows[1]["groups"] == [{"lr": 0.1}] and rows[1]["batch"] == 1
    assert all(m.body["drops"] == {"telemetry": 2, "recording": 0} for m in messages)
    assert all(m.arrays == {} for m in messages)          # the scalars were taken out of the arrays into the rows


def test_a_step_without_a_loss_has_loss_none():
    batch, published = _batch()
    batch.add(_row(1), [("acc", 1.0)], now=0.0)
    (row,), = [m.body["rows"] for m in (pending.resolve() for pending in published)]
    assert row["loss"] is None and row["metrics"] == {"acc": 1.0} and "not_finite" not in row


def test_device_values_are_stacked_once_per_step_as_float32_copies():
    """Values on an accelerator are stacked by ``stack_on_device`` (run here on CPU tensors): one float32 vector
    whatever their dtypes and single-element shapes, copied, so a value updated in place later keeps its step's."""
    from revacnn.telemetry.scalars import stack_on_device

    running = torch.tensor([0.25])  # a [1]-shaped buffer a module logs and updates in place
    values = [torch.tensor(1.5, dtype=torch.float16), running, torch.tensor(3, dtype=torch.int64),
              torch.tensor(2.0, dtype=torch.float64, requires_grad=True) * 2]
    stacked = stack_on_device(values)
    running += 1.0
    assert stacked.dtype == torch.float32 and not stacked.requires_grad
    assert stacked.tolist() == [1.5, 0.25, 3.0, 4.0]
