"""2-process CPU DDP (gloo): telemetry from rank 0 only, nothing hangs, steering identical on every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import Listener

pytestmark = pytest.mark.ddp
SCRIPT = Path(__file__).with_name("ddp_run.py")


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    """The 2-rank run in a process group of its own, so that a hung run can be ended with every rank."""
    return subprocess.Popen([sys.executable, str(SCRIPT), "--run-dir", str(run_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)   # both ranks: a hang must not outlive the test
        output, _ = process.communicate()
        raise AssertionError(f"the DDP run hung (killed after {timeout} s):\n{output[-4000:]}") from None
    assert process.returncode == 0, output[-4000:]
    return output


def connection(run_dir: Path):
    path = run_dir / "connection.json"
    return path if path.exists() else None


@pytest.mark.parametrize("run_dir", ["given", "default"])
def test_ddp_run_publishes_from_rank_zero_only_and_finishes(tmp_path, run_dir):
    """Also with the callback's defaults, where its run directory comes from ``Trainer.log_dir``: a collective
    that rank 0 alone asked for, so every run hung in ``setup``."""
    extra = ["--default-run-dir"] if run_dir == "default" else []
    process = start(tmp_path, "--epochs", "2", "--batches", "6", *extra)
    directory = tmp_path if run_dir == "given" else tmp_path / "revacnn"
    listener = Listener(lambda: connection(directory), timeout=200).start()
    output = finish(process)
    messages = listener.join()
    steps = [m.body["step"] for m in messages if m.type == "step"]
    assert steps == sorted(set(steps)), "every step is published once: only rank 0 publishes"
    assert steps[-1] == 12
    statuses = [m.body for m in messages if m.type == "status"]
    assert statuses[-1]["state"] == "finished" and statuses[-1]["world_size"] == 2
    assert len([m for m in messages if m.type == "structure"]) == 1
    assert sorted(p.name for p in tmp_path.glob("**/connection.json")) == ["connection.json"]
    assert output.count("watch it with") == 1


def send_and_wait(client, commands, timeout=60.0):
    """Send every ``(op, args)`` at once (the trainer applies them in order; one at a time, a run on a slow machine
    could end before the last was sent), then wait for their final acks; returns them in command order."""
    ids = [client.send_command(op, args) for op, args in commands]
    finals: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(finals) < len(ids) and time.monotonic() < deadline:
        message = client.recv(0.2)
        if message is not None and message.type == "ack" and message.body["id"] in ids \
                and message.body["status"] != "queued":
            finals[message.body["id"]] = message.body
    missing = [op for (op, _), command_id in zip(commands, ids) if command_id not in finals]
    assert not missing, f"no final ack for {missing}"
    return [finals[command_id] for command_id in ids]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_steering_under_ddp_keeps_ranks_bitwise_equal(tmp_path, accumulate):
    """With gradient accumulation, too: rank 0 takes commands only where a step starts, and so must every rank."""
    from revacnn.wire.client import RunClient

    process = start(tmp_path, "--epochs", "2", "--batches", "40", "--slow", "0.05", "--accumulate", str(accumulate))
    deadline = time.monotonic() + 120
    while connection(tmp_path) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with RunClient(tmp_path) as client:
        client.connect(timeout=30)
        acks = send_and_wait(client, [("widen", {"layer": "net.conv2", "count": 3}),
                                      ("freeze", {"layer": "net.conv1", "filters": [0, 2]}),
                                      ("remove_filters", {"layer": "net.conv3", "filters": [1, 4]}),
                                      ("set_hparams", {"lr": 0.02})])
    finish(process)
    assert [ack["status"] for ack in acks] == ["done"] * 4, acks
    assert acks[0]["step"] <= acks[1]["step"] <= acks[2]["step"]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 80 // accumulate
    assert ranks[0]["model"]["net.conv2.weight"].shape[0] == 23
    assert ranks[0]["model"]["net.conv3.weight"].shape == (18, 23, 5, 5)
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name]), f"{name} differs between ranks"
    for key, state in ranks[0]["optimizer"]["state"].items():
        for field, value in state.items():
            other = ranks[1]["optimizer"]["state"][key][field]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer {key}.{field} differs"
    assert all(group["lr"] == 0.02 for r in ranks for group in r["optimizer"]["param_groups"])
