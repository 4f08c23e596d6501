"""Two hosts: the trainer in one network namespace, the clients in another, joined by a veth pair (10.77.x.y).

The namespaces, the veth pair and its addresses are made by this test and removed after it; nothing else on the
machine is touched and no traffic leaves the two namespaces. Needs root and iproute2; where namespaces cannot be
made the test falls back to two processes on loopback and says so (the skip reason / warning shows why).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest

from revacnn.wire.connection import allow_key, generate_keypair
from revacnn.recording import open_run

HERE = Path(__file__).parent


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    """(trainer command prefix, client command prefix, trainer address)."""
    tag = uuid.uuid4().hex[:6]
    server_ns, client_ns = f"rvs{tag}", f"rvc{tag}"
    reason = None
    if shutil.which("ip") is None or os.geteuid() != 0:
        reason = "iproute2 missing or not root"
    created = []
    if reason is None:
        steps = [("netns", "add", server_ns), ("netns", "add", client_ns),
                 ("link", "add", f"rvs{tag}", "type", "veth", "peer", "name", f"rvc{tag}"),
                 ("link", "set", f"rvs{tag}", "netns", server_ns), ("link", "set", f"rvc{tag}", "netns", client_ns),
                 ("-n", server_ns, "addr", "add", "10.77.0.1/24", "dev", f"rvs{tag}"),
                 ("-n", client_ns, "addr", "add", "10.77.0.2/24", "dev", f"rvc{tag}"),
                 ("-n", server_ns, "link", "set", f"rvs{tag}", "up"), ("-n", client_ns, "link", "set", f"rvc{tag}", "up"),
                 ("-n", server_ns, "link", "set", "lo", "up"), ("-n", client_ns, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                reason = f"`ip {' '.join(step)}` failed: {done.stderr.strip()}"
                break
            if step[0] == "netns":
                created.append(step[2])
    try:
        if reason is None:
            yield (["ip", "netns", "exec", server_ns], ["ip", "netns", "exec", client_ns], "10.77.0.1", True)
        else:
            warnings.warn(f"network namespaces unavailable ({reason}); falling back to two processes on loopback")
            yield ([], [], "127.0.0.1", False)
    finally:
        for namespace in created:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "del", namespace)


def test_steering_across_two_hosts_with_curve_and_an_intruder(two_hosts, tmp_path):
    server_prefix, client_prefix, address, isolated = two_hosts
    keys, client_keys = tmp_path / "keys", tmp_path / "laptop"
    generate_keypair(keys, "server")
    laptop_public, laptop_secret = generate_keypair(client_keys, "laptop")
    _, intruder_secret = generate_keypair(tmp_path / "intruder", "intruder")
    allow_key(laptop_public, keys)
    trainer = subprocess.Popen(
        [*server_prefix, sys.executable, str(HERE / "remote_trainer.py"), "--root", str(tmp_path / "run"), "--tiny",
         "--host", address, "--keys-dir", str(keys), "--max-steps", "3000", "--slow", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        connection = None
        for line in trainer.stdout:
            if line.startswith("CONNECTION "):
                connection = line.split(" ", 1)[1].strip()
                break
        assert connection, "the trainer did not start"
        info = json.loads(Path(connection).read_text())
        assert info["control"].startswith(f"tcp://{address}:") and info["security"] == "curve"
        assert "secret" not in Path(connection).read_text()
        if isolated:  # the trainer's address is not reachable from this (the root) namespace at all
            assert address not in _ip("-o", "addr").stdout
        client = subprocess.run([*client_prefix, sys.executable, str(HERE / "remote_client.py"), connection,
                                 str(laptop_secret), str(intruder_secret)],
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr[-2000:]
        seen = json.loads(client.stdout.strip().splitlines()[-1])
        rest, _ = trainer.communicate(timeout=60)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    done = json.loads(next(line for line in rest.splitlines() if line.startswith("DONE "))[5:])
    # the allowed client read telemetry and steered across the hosts
    assert seen["steps"] >= 5 and seen["acks"] == {"set_hparams": "done", "stop": "done"}
    assert seen["final_state"] == "stopped" and done["step"] < 3000
    assert done["lr"] == pytest.approx(0.01)  # the laptop's lr, never the intruder's 0.5
    # the third party was refused, heard nothing and got no answer; its commands were never applied
    intruder = seen["intruder"]
    assert "refused this client's key" in intruder["refused"]
    assert intruder["plain_refused"]
    assert intruder["telemetry_frames"] == 0 and intruder["replies"] == 0
    assert seen["security"]["mode"] == "curve" and seen["security"]["denied"] >= 1
    run = open_run(Path(connection).parent)
    assert [entry.get("op") for entry in run.steering_log() if entry.get("status") == "done"] == ["set_hparams",
                                                                                                    "stop"]
