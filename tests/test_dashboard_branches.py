"""The dashboard's side of undo and rewind, without a browser: the run state charts a new branch's steps again, the
training chart draws the path to the current state in colour and the abandoned steps grey, the banner shows the
divergence guard's event, and the event log offers Undo on the commands that left a restore point."""

from __future__ import annotations

import math

from revacnn.wire.protocol import Message
from revacnn_dash.data.state import RunState
from revacnn_dash.figures.tables import event_table
from revacnn_dash.views.header import banner_children
from revacnn_dash.views.history import undo_button
from revacnn_dash.views.training import training_chart


def steps(state, first, last, loss):
    rows = [{"step": s, "loss": loss(s), "groups": [{"lr": 0.02}]} for s in range(first, last + 1)]
    state.apply(Message("steps", {"first": first, "last": last, "rows": rows}))


def branch_ack(state, command_id, op, branch, parent, from_step, at_step, **extra):
    result = {"branch": {"branch": branch, "parent": parent, "from_step": from_step, "at_step": at_step,
                         "restore_point": 3, "reason": op}, **extra}
    state.apply(Message("ack", {"id": command_id, "op": op, "status": "done", "step": from_step, "error": None,
                                "result": result}))


class OneRun:
    def __init__(self, state):
        self.state = state

    def get(self, key):
        return self.state


def build_run():
    state = RunState("tcp://127.0.0.1:1")
    steps(state, 1, 10, lambda s: 2.0 - 0.1 * s)
    state.apply(Message("ack", {"id": "a", "op": "set_hparams", "status": "done", "step": 10, "error": None,
                                "result": {"restore_point": 3, "changes": {}}}))
    steps(state, 11, 14, lambda s: math.inf)          # diverged after the change
    branch_ack(state, "b", "rewind", 1, 0, 10, 14)      # undo from the event log: back to step 10
    steps(state, 11, 16, lambda s: 1.0)
    branch_ack(state, "c", "rewind", 2, 1, 12, 16)
    steps(state, 13, 15, lambda s: 0.5)
    return state


def test_each_branch_is_charted_and_the_abandoned_steps_are_grey():
    state = build_run()
    summary = state.summary()
    assert [b["branch"] for b in summary["branches"]] == [0, 1, 2]
    assert summary["loss_not_finite_since"] is None          # the new branch is finite again
    fig, cursor, _ = training_chart(OneRun(state), 0, state.key, [], 0.0, None, "training")
    live, abandoned = fig.data[0], fig.data[6]   # trace 5 is the smoothed loss
    assert list(live.x) == list(range(1, 11)) + [11, 12] + [13, 14, 15]
    assert list(live.y[-3:]) == [0.5, 0.5, 0.5] and list(live.y[10:12]) == [1.0, 1.0]
    assert [x for x in abandoned.x if x is not None] == [11, 12, 13, 14, 13, 14, 15, 16]
    assert abandoned.x[4] is None                             # a gap between the two abandoned stretches
    assert cursor["branches"] == 3
    # a rewind after the browser drew the chart: drawn anew (not patched)
    branch_ack(state, "d", "rewind", 3, 2, 14, 15)
    again, _, _ = training_chart(OneRun(state), 0, state.key, [], 0.0, cursor, "training")
    assert list(again.data[0].x)[-1] == 14


def test_undo_buttons_banner_and_divergence_label():
    state = build_run()
    events = {e["id"]: e for e in state.event_list()}
    assert undo_button(events["a"]).id == {"type": "undo-command", "point": 3}
    assert undo_button(events["b"]) == ""                     # a rewind left no restore point of its own
    assert "ev-undo" in str(event_table(list(events.values()), undo_button))
    divergence = {"step": 14, "loss": None, "reason": "non-finite loss", "median": 1.2, "action": "rewind",
                  "restore_point": 2, "count": 1}
    text = " ".join(str(c) for c in banner_children({"conn": "live", "conn_message": "", "divergence": divergence}))
    assert "divergence at step 14: non-finite loss" in text and "rewound to restore point 2" in text
    branch_ack(state, "divergence-1", "rewind", 3, 2, 12, 15, divergence=divergence)
    assert [e["label"] for e in state.event_list() if e["id"] == "divergence-1"] == ["divergence → rewind"]
