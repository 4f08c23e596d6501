"""Two nodes, one client: a 2-node DDP job (gloo, ``devices=1, num_nodes=2``, one process per node launched by hand)
across network namespaces, steered from a third.

Three namespaces — node 0, node 1 and the client's — are joined by a bridge in a fourth (10.78.0.1, .2 and .3 on one
segment), as three machines on one switch. Each node is started the way a cluster without a scheduler starts Lightning
(Lightning's ``LightningEnvironment``: ``LOCAL_RANK`` set means the processes are created externally; ``MASTER_ADDR``
is node 0's address, ``NODE_RANK`` gives the global rank with one device per node) and gloo is told its interface with
``GLOO_SOCKET_IFNAME``. Rank 0 binds the callback's sockets on its own address — not loopback, which the callback
refuses without CURVE (short of ``insecure_bind``), so the run uses CURVE keys — and the client in the third namespace
reads the telemetry, widens ``net.conv2`` mid-run, trains on and stops the run. Both ranks must have applied the widen
at the same step and end bitwise equal, parameters and optimizer state; the dashboard's data side (its ``Hub``), run
in the client's namespace, must have seen the run to its end, widened.

Everything made here (namespaces, bridge, veth pairs, addresses) is removed after the test; nothing else on the machine
is touched and no traffic leaves the namespaces. Where a bridge cannot be made the client shares node 1's namespace
(two namespaces, one veth pair); where namespaces cannot be made at all the three processes run on loopback — either
way with a warning saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from revacnn.recording import open_run
from revacnn.wire.connection import allow_key, generate_keypair

pytestmark = pytest.mark.ddp
HERE = Path(__file__).parent
SCRIPT = HERE / "multinode_node.py"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@dataclass
class Hosts:
    """Where each process runs: a command prefix, its address and the interface gloo uses, per node; the client's."""

    node_prefix: list[list[str]]
    node_address: list[str]
    node_ifname: list[str]
    client_prefix: list[str]
    topology: str   # "three namespaces", "two namespaces" or "loopback"
    namespaces: list[str] = field(default_factory=list)


def _build(steps: list[tuple[str, ...]], created: list[str]) -> str | None:
    """Run the ``ip`` steps in order; the reason the first failing one gave, or None."""
    for step in steps:
        done = _ip(*step)
        if done.returncode != 0:
            return f"`ip {' '.join(step)}` failed: {done.stderr.strip()}"
        if step[:2] == ("netns", "add"):
            created.append(step[2])
    return None


def _three_namespaces(tag: str, created: list[str]) -> tuple[str | None, Hosts | None]:
    hub, bridge = f"rvh{tag}", f"rvb{tag}"
    spaces = {x: f"rv{x}{tag}" for x in "01c"}
    addresses = {"0": "10.78.0.1", "1": "10.78.0.2", "c": "10.78.0.3"}
    steps = [("netns", "add", hub), *[("netns", "add", ns) for ns in spaces.values()],
             ("-n", hub, "link", "add", bridge, "type", "bridge"), ("-n", hub, "link", "set", bridge, "up")]
    for x, ns in spaces.items():
        inner, outer = f"rv{x}{tag}", f"rp{x}{tag}"   # the host's end, the switch port
        steps += [("link", "add", inner, "type", "veth", "peer", "name", outer),
                  ("link", "set", inner, "netns", ns), ("link", "set", outer, "netns", hub),
                  ("-n", hub, "link", "set", outer, "master", bridge), ("-n", hub, "link", "set", outer, "up"),
                  ("-n", ns, "addr", "add", f"{addresses[x]}/24", "dev", inner),
                  ("-n", ns, "link", "set", inner, "up"), ("-n", ns, "link", "set", "lo", "up")]
    reason = _build(steps, created)
    if reason:
        return reason, None
    prefix = {x: ["ip", "netns", "exec", ns] for x, ns in spaces.items()}
    return None, Hosts([prefix["0"], prefix["1"]], [addresses["0"], addresses["1"]], [f"rv0{tag}", f"rv1{tag}"],
                       prefix["c"], "three namespaces", [hub, *spaces.values()])


def _two_namespaces(tag: str, created: list[str]) -> tuple[str | None, Hosts | None]:
    spaces = [f"rw0{tag}", f"rw1{tag}"]
    steps = [("netns", "add", spaces[0]), ("netns", "add", spaces[1]),
             ("link", "add", spaces[0], "type", "veth", "peer", "name", spaces[1])]
    for index, ns in enumerate(spaces):
        steps += [("link", "set", ns, "netns", ns), ("-n", ns, "addr", "add", f"10.78.1.{index + 1}/24", "dev", ns),
                  ("-n", ns, "link", "set", ns, "up"), ("-n", ns, "link", "set", "lo", "up")]
    reason = _build(steps, created)
    if reason:
        return reason, None
    prefix = [["ip", "netns", "exec", ns] for ns in spaces]
    return None, Hosts(prefix, ["10.78.1.1", "10.78.1.2"], list(spaces), prefix[1], "two namespaces", spaces)


def _remove(created: list[str], tag: str) -> None:
    for namespace in created:  # deleting a namespace deletes the veth ends and the bridge in it, and so the pairs
        _ip("netns", "del", namespace)
    for line in _ip("-o", "link").stdout.splitlines():  # a pair made but not yet moved into a namespace
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if name.endswith(tag) and name.startswith("r"):
            _ip("link", "del", name)
    created.clear()


@pytest.fixture
def three_hosts():
    tag = uuid.uuid4().hex[:6]
    created: list[str] = []
    reasons = []
    hosts = None
    if shutil.which("ip") is None or os.geteuid() != 0:
        reasons.append("iproute2 missing or not root")
    else:
        for build in (_three_namespaces, _two_namespaces):
            reason, hosts = build(tag, created)
            if hosts is not None:
                break
            reasons.append(reason)
            _remove(created, tag)
    try:
        if hosts is None:
            warnings.warn(f"network namespaces unavailable ({'; '.join(reasons)}); falling back to loopback")
            hosts = Hosts([[], []], ["127.0.0.1", "127.0.0.1"], ["lo", "lo"], [], "loopback")
        elif reasons:
            warnings.warn(f"no bridge for a third namespace ({reasons[0]}); the client shares node 1's namespace")
        yield hosts
    finally:
        _remove(created, tag)


class Node:
    """One node's process, in a process group of its own (``ip netns exec`` execs the command: same group), its
    output read by a thread so a chatty process never blocks and every wait can be bounded."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, prefix: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
            if self.process.poll() is not None and not self._reader.is_alive():
                return None
            time.sleep(0.1)
        return None

    def finish(self, timeout: float) -> int | None:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)

    def output(self) -> str:
        return "".join(self.lines)[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_node_ddp_steered_from_a_third_host(three_hosts: Hosts, tmp_path):
    hosts = three_hosts
    keys, client_keys = tmp_path / "keys", tmp_path / "laptop"
    generate_keypair(keys, "server")
    laptop_public, laptop_secret = generate_keypair(client_keys, "laptop")
    allow_key(laptop_public, keys)
    master_port = 29500 if hosts.namespaces else _free_port()   # a fresh namespace has every port free
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in
                                             os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK",
                 "LOCAL_WORLD_SIZE", "GLOO_SOCKET_IFNAME"):
        base_env.pop(name, None)
    out = [tmp_path / "node0", tmp_path / "node1"]
    nodes: list[Node] = []
    started = time.monotonic()
    try:
        for rank in (0, 1):
            env = dict(base_env, MASTER_ADDR=hosts.node_address[0], MASTER_PORT=str(master_port), NODE_RANK=str(rank),
                       WORLD_SIZE="2", LOCAL_RANK="0", GLOO_SOCKET_IFNAME=hosts.node_ifname[rank])
            # the same command on both nodes, as a cluster runs one script everywhere: host is rank 0's address
            nodes.append(Node([*hosts.node_prefix[rank], sys.executable, str(SCRIPT), "node", "--out", str(out[rank]),
                               "--host", hosts.node_address[0], "--keys-dir", str(keys)], env))
        connection = nodes[0].wait_for("CONNECTION ", timeout=240)
        assert connection, f"node 0 did not start:\n{nodes[0].output()}\n--- node 1:\n{nodes[1].output()}"
        info = json.loads(Path(connection).read_text())
        assert info["security"] == "curve"
        for endpoint in (info["control"], info["telemetry"]):
            assert endpoint.startswith(f"tcp://{hosts.node_address[0]}:"), endpoint
        if hosts.namespaces:   # node 0's address exists in its namespace only, not in this (the root) one
            assert hosts.node_address[0] not in _ip("-o", "addr").stdout
        client = subprocess.run([*hosts.client_prefix, sys.executable, str(SCRIPT), "client", connection,
                                 str(laptop_secret), "--after", "30", "--timeout", "180"],
                                env=base_env, capture_output=True, text=True, timeout=240)
        assert client.returncode == 0, client.stderr[-3000:]
        seen = json.loads(client.stdout.strip().splitlines()[-1])
        codes = [node.finish(timeout=120) for node in nodes]
        assert codes == [0, 0], "\n--- ".join(f"node {r} exited {c}:\n{n.output()}"
                                              for r, (c, n) in enumerate(zip(codes, nodes)))
    finally:
        for node in nodes:
            node.kill()
    elapsed = time.monotonic() - started

    # the client, on another host, saw the run's telemetry, and its commands were applied and acknowledged
    assert not seen["timed_out"], seen
    assert seen["world_size"] == 2 and (seen["security"] or {}).get("mode") == "curve"
    widen, stop = seen["acks"]["widen"], seen["acks"]["stop"]
    assert widen["status"] == "done" and stop["status"] == "done", seen["acks"]
    assert seen["final_state"] == "stopped"
    # the dashboard's data side on the third host saw the run to its end, widened, over CURVE
    shown = seen["dashboard"]
    assert shown["run_id"] == seen["welcome"]["run"] and shown["state"] == "stopped"
    assert shown["security"] == "curve" and shown["step"] >= max(seen["steps"])
    assert shown["layers"]["net.conv2"] == 6
    assert len([s for s in seen["steps"] if s < widen["step"]]) >= 5   # read before steering
    assert seen["steps"] == sorted(set(seen["steps"]))

    ranks = [torch.load(out[r] / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank, state in enumerate(ranks):
        assert (state["global_rank"], state["node_rank"], state["world_size"], state["num_nodes"]) == (rank, rank, 2, 2)
        assert state["backend"] == "gloo"
    # the widen applied on both nodes at the step rank 0 acknowledged, and both trained on with it
    assert ranks[0]["widened_at"] == ranks[1]["widened_at"] == widen["step"], (ranks[0]["widened_at"],
                                                                             ranks[1]["widened_at"], widen["step"])
    assert ranks[0]["step"] == ranks[1]["step"] >= widen["step"] + 30
    for state in ranks:
        assert state["width_before"] == 4
        assert state["model"]["net.conv2.weight"].shape == (6, 4, 5, 5)
        assert state["model"]["net.conv2.bias"].shape == (6,)
        assert state["model"]["net.conv3.weight"].shape == (4, 6, 5, 5)
    # and ended bitwise equal: parameters, buffers and optimizer state
    assert ranks[0]["model"].keys() == ranks[1]["model"].keys()
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name]), f"{name} differs between the nodes"
    assert ranks[0]["optimizer"]["state"].keys() == ranks[1]["optimizer"]["state"].keys()
    assert ranks[0]["optimizer"]["state"], "no optimizer state to compare"
    for key, state in ranks[0]["optimizer"]["state"].items():
        for name, value in state.items():
            other = ranks[1]["optimizer"]["state"][key][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer {key}.{name} differs"
    assert ranks[0]["optimizer"]["param_groups"] == ranks[1]["optimizer"]["param_groups"]

    # rank 0 alone published and recorded: node 1 has no connection file, node 0's recording holds the steering
    assert not list(out[1].glob("**/connection.json"))
    log = open_run(Path(connection).parent).steering_log()
    assert [entry.get("op") for entry in log if entry.get("status") == "done"] == ["widen", "stop"]
    print(f"{hosts.topology}: {elapsed:.1f} s, widened at step {widen['step']}, stopped at {ranks[0]['step']}")
