"""The hostile-client benchmark's book-keeping: which windows flood with what, how each flood's windows are paired
with their idle neighbours, that a flood's backlog is waited for before an idle window is timed, and the client's
pacing (a batch, a ping, at most two batches in flight). No timing is asserted, and no socket is opened."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import msgpack
import pytest
import torch

from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.wire.protocol import Codec, validate_request

from helpers import quiet_trainer

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "hostile_client.py"
_spec = importlib.util.spec_from_file_location("revacnn_benchmark_hostile", _PATH)
hostile = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = hostile
_spec.loader.exec_module(hostile)


class FakeClient:
    """Records what the windows told the client; after a flood it reports its backlog handled only at the third
    time the windows ask (at the global steps it records)."""

    def __init__(self) -> None:
        self.modes: list[str] = []
        self.asked: list[int] = []
        self.trainer = None
        self.backlog = 0

    def switch(self, mode: str) -> None:
        if mode == "idle" and self.modes and self.modes[-1] != "idle":
            self.backlog = 2
        self.modes.append(mode)

    def drained(self) -> bool:
        self.asked.append(self.trainer.global_step)
        self.backlog -= 1
        return self.backlog < 0


def test_floods_take_turns_in_on_windows_and_each_pairs_with_its_idle_neighbours(tmp_path):
    window, settle, rounds, floods = 8, 2, 2, ["state", "commands", "malformed"]
    client = FakeClient()
    windows = hostile.FloodWindows(floods, window, settle, client)
    torch.manual_seed(0)
    trainer = quiet_trainer(accelerator="cpu", devices=1, max_steps=window * (2 * rounds * len(floods) + 2),
                            max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
                            callbacks=[windows])
    client.trainer = trainer
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.02), DigitsDataModule(batch_size=8))

    # warm-up and window 1 idle, then floods in turn in the even windows (in reverse order in the second round),
    # the fit ending with an idle window
    expected = [None, None, "state", None, "commands", None, "malformed", None, "malformed", None, "commands", None,
                "state", None]
    assert windows.kinds == expected
    assert client.modes == [kind or "idle" for kind in expected] + ["idle"]     # … and idle again at the end
    # idle windows ask from their settle-th step on until the backlog is handled; flood windows never ask
    idle = [index for index, kind in enumerate(expected) if kind is None]
    after_flood = [index for index in idle if index > 1]
    assert client.asked == [step for index in idle
                            for step in range(index * window + settle,
                                              index * window + settle + (3 if index in after_flood else 1))]
    assert windows.waited == [2 if index in after_flood else 0 for index in range(len(expected))]
    # … and time only the steps from the one at which it was: two fewer in the idle windows after a flood
    assert [record[1] for record in windows.windows] == [
        window - settle - (2 if index in after_flood else 0) for index in range(len(expected))]
    assert all(slowest > 0 for slowest in windows.slowest)

    rates = [steps / seconds for _, steps, seconds in windows.windows]
    for kind in floods:
        paired = windows.paired(kind)
        on = [index for index, this in enumerate(expected) if this == kind]
        assert paired.ratios() == pytest.approx(
            [rates[index] / ((rates[index - 1] + rates[index + 1]) / 2) for index in on])
        assert paired.rate(True) == pytest.approx(statistics.median(rates[index] for index in on))
        assert windows.slowest_step(kind) == max(windows.slowest[index] for index in on)
    assert windows.slowest_step(None) == max(windows.slowest[index] for index in idle[1:])

    # an idle window that never got to time a step (its backlog took the whole window) pairs nothing
    windows.windows[3][1], windows.windows[3][2] = 0, 0.0
    assert len(windows.paired("state").ratios()) == 1 and len(windows.paired("commands").ratios()) == 1


def test_an_idle_window_is_timed_only_once_the_trainers_own_queues_are_back_to_usual(tmp_path):
    window, settle = 8, 2
    windows = hostile.FloodWindows(["commands"], window, settle)   # no client: it is always drained
    trainer = quiet_trainer(accelerator="cpu", devices=1, max_steps=window * 4, max_epochs=-1, limit_val_batches=0,
                            num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[windows])
    late = range(3 * window + settle, 3 * window + settle + 3)     # the idle window after the flood: 3 steps late

    def backlog() -> int:
        return hostile.TRAINER_BACKLOG + (trainer.global_step in late)

    windows.trainer_backlog = backlog
    torch.manual_seed(0)
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.02), DigitsDataModule(batch_size=8))
    assert windows.kinds == [None, None, "commands", None]
    assert windows.waited == [0, 0, 0, 3]
    assert [record[1] for record in windows.windows] == [window - settle] * 3 + [window - settle - 3]


def test_client_sends_a_batch_and_a_ping_and_waits_while_more_than_one_ping_is_unanswered():
    flood = hostile.Flood(state_elements=10, lr=0.02, batch={"state": 2, "commands": 3, "malformed": 4})
    first = flood.next_batch("commands", now=0.0)
    second = flood.next_batch("commands", now=0.1)
    assert len(first) == 4 and len(second) == 4                    # 3 commands + a ping each
    assert flood.next_batch("commands", now=0.2) == []              # two pings out: the backlog is full
    ids = [msgpack.unpackb(frames[0])["body"]["id"] for frames in first[:3] + second[:3]]
    assert len(set(ids)) == 6                                       # every command id unique
    ping = msgpack.unpackb(first[-1][0])
    assert ping["type"] == "hello" and ping["body"]["versions"] == [999]

    # the first ping's answer frees a slot; other replies are counted by type and status
    assert flood.received({"type": "error", "body": {"req": ping["body"]["req"], "error": "x"}}, now=0.5) == "ping-1"
    assert flood.received({"type": "ack", "body": {"req": "c1", "status": "queued"}}, now=0.5) is None
    assert flood.received({"type": "error", "body": {"req": "", "error": "bad_header"}}, now=0.5) is None
    assert flood.received("garbage", now=0.5) is None
    assert flood.replies == {"ack queued": 1, "error bad_header": 1, "undecodable": 1}
    assert len(flood.next_batch("malformed", now=0.6)) == 5
    assert flood.sent == {"commands": 6, "malformed": 4}

    # a ping that never comes back is given up on after the timeout, which grows with the slowest round trip
    assert flood.ping_timeout() == pytest.approx(max(hostile.PING_TIMEOUT_S, 1.5))
    assert flood.next_batch("state", now=0.7) == []
    assert len(flood.next_batch("state", now=0.1 + hostile.PING_TIMEOUT_S + 0.01)) == 3
    assert flood.pings_lost == 1


def test_client_is_drained_when_its_last_ping_came_back_and_every_command_has_its_final_ack():
    flood = hostile.Flood(state_elements=10, lr=0.02, batch={"state": 1, "commands": 2, "malformed": 1})
    flood.next_batch("commands", now=0.0)
    assert not flood.drained(None, now=0.1)                           # the drain ping has not come back
    flood.received({"type": "ack", "body": {"req": "c1", "id": "c1", "status": "queued"}}, now=0.1)
    flood.received({"type": "ack", "body": {"req": "c2", "id": "c2", "status": "queued"}}, now=0.1)
    assert flood.outstanding() == 2
    flood.received({"type": "ack", "body": {"req": "c1", "id": "c1", "status": "done"}}, now=0.2)
    assert not flood.drained(0.3, now=0.3)                            # one command still queued in the trainer
    flood.received({"type": "ack", "body": {"req": "c2", "id": "c2", "status": "error"}}, now=0.4)
    assert flood.outstanding() == 0 and flood.drained(0.3, now=0.4)
    flood.next_batch("commands", now=1.0)                             # two more, never acked queued (dropped
    assert flood.drained(1.0, now=1.0)                                # unread by the rate limit): not waited for
    flood.received({"type": "ack", "body": {"req": "c5", "id": "c5", "status": "queued"}}, now=1.0)
    assert not flood.drained(1.0, now=1.0 + hostile.PING_TIMEOUT_S)   # queued, its final ack never comes:
    assert flood.drained(1.0, now=1.01 + hostile.PING_TIMEOUT_S)      # … given up on after the timeout
    assert flood.totals()["unanswered_commands"] == 1


def test_malformed_messages_are_all_refused_and_the_others_are_valid():
    codec = Codec("", max_buffers=64, max_bytes=1 << 20)

    def check(frames):
        message = codec.decode(frames)
        validate_request(message)
        return message

    for frames in hostile.malformed_requests():
        # ProtocolError, or (before issue 30's fix) a TypeError that the server answers as ``internal``
        with pytest.raises(Exception):
            check(frames)
    assert check(hostile.state_request(1000)).type == "state"
    assert check(hostile.ping("p")).body["versions"] == [999]
    assert check(hostile.command_request(2, "x", 0.02)).body == {"req": "c2", "id": "x-2", "op": "set_hparams",
                                                                  "args": {"lr": 0.02}}
    assert sum(len(frame) for frame in hostile.state_request(1_000_000)) < 1 << 20   # under the socket's limit
