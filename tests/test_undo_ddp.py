"""Undo and rewind under 2-process CPU (gloo) DDP: every rank goes back to the same restore point at the same step
(the commands ride rank 0's broadcast), and the ranks stay bitwise equal."""

from __future__ import annotations

import time

import pytest
import torch

from helpers import wait_for_message
from test_ddp import connection, finish, send_and_wait, start

pytestmark = pytest.mark.ddp


def test_undo_and_rewind_under_ddp_keep_ranks_bitwise_equal(tmp_path):
    from revacnn.wire.client import RunClient

    process = start(tmp_path, "--epochs", "2", "--batches", "40", "--slow", "0.05", "--restore-every", "10")
    deadline = time.monotonic() + 120
    while connection(tmp_path) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with RunClient(tmp_path) as client:
        client.connect(timeout=30)
        acks = send_and_wait(client, [("widen", {"layer": "net.conv2", "count": 3}), ("set_hparams", {"lr": 0.02}),
                                      ("undo", {})])
        applied = acks[2]["step"]            # commands apply at broadcast steps: multiples of command_every (10)
        # past the next periodic restore points (every 10 steps)
        wait_for_message(client, lambda m: m.type == "status" and (m.body.get("step") or 0) > applied + 25, 60)
        acks += send_and_wait(client, [("rewind", {"step": applied})])
    finish(process)
    assert [ack["status"] for ack in acks] == ["done"] * 4, acks
    left_at = acks[3]["result"]["branch"]["at_step"]
    assert applied % 10 == 0 and left_at > applied and acks[3]["step"] == applied   # an ack's step: after it
    assert [c["op"] for c in acks[2]["result"]["taken_back"]] == ["set_hparams"]
    # the periodic point of that step, taken after its commands (the widen, kept)
    assert acks[3]["result"]["restore_point"]["step"] == applied
    assert acks[3]["result"]["restore_point"]["kind"] == "periodic"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["branches"] == ranks[1]["branches"]
    assert [b["from_step"] for b in ranks[0]["branches"]] == [0, applied, applied]
    assert [b["at_step"] for b in ranks[0]["branches"]][1:] == [applied, left_at]
    assert ranks[0]["model"]["net.conv2.weight"].shape[0] == 23
    assert ranks[0]["step"] == ranks[1]["step"]
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name]), f"{name} differs between ranks"
    for key, state in ranks[0]["optimizer"]["state"].items():
        for field, value in state.items():
            other = ranks[1]["optimizer"]["state"][key][field]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer {key}.{field} differs"
    assert all(group["lr"] == 0.05 for r in ranks for group in r["optimizer"]["param_groups"])
