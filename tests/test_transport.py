"""Publisher and RunClient over real ZeroMQ sockets on loopback."""

from __future__ import annotations

import os
import time

import msgpack
import numpy as np
import pytest
import zmq

from revacnn.wire.client import ConnectionFailed, RunClient
from revacnn.wire.connection import ConnectionInfo
from revacnn.wire.protocol import Codec, Message
from revacnn.wire.publisher import Publisher

from helpers import wait_for


@pytest.fixture
def publisher():
    pub = Publisher("test-run", heartbeat_s=0.2).start()
    yield pub
    pub.close()


def receive_until(client: RunClient, predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        message = client.recv(0.1)
        if message is not None:
            seen.append(message)
            if predicate(message):
                return message, seen
    raise AssertionError(f"condition not met within {timeout}s; saw {[m.type for m in seen]}")


def raw_dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_binds_loopback_by_default_and_refuses_public_bind_without_opt_in():
    with pytest.raises(ValueError, match="SSH tunnel"):
        Publisher("r", host="0.0.0.0")
    pub = Publisher("r").start()
    try:
        assert pub.telemetry_endpoint.startswith("tcp://127.0.0.1:")
        assert pub.control_endpoint.startswith("tcp://127.0.0.1:")
    finally:
        pub.close()


def test_late_joiner_gets_structure_and_latest_state_within_two_seconds(publisher):
    publisher.publish(Message("structure", {"revision": 0, "layers": [{"name": "conv1", "out": 4}]}))
    for step in range(1, 51):
        publisher.publish(Message("step", {"step": step, "per_filter": step % 10 == 0},
                                  {"filters": np.full((5, 4), step, np.float32)} if step % 10 == 0 else {}))
    wait_for(lambda: publisher.queue_length == 0)  # everything published long before the client exists
    started = time.monotonic()
    with RunClient(publisher.control_endpoint) as client:
        welcome = client.connect()
        structure, _ = receive_until(client, lambda m: m.type == "structure", timeout=2.0)
        elapsed = time.monotonic() - started
        assert welcome["run"] == "test-run" and welcome["version"] == 1
        assert structure.body["layers"][0]["name"] == "conv1"
        assert elapsed < 2.0
        step, _ = receive_until(client, lambda m: m.type == "step", timeout=2.0)
        assert step.body["step"] == 50 and step.body["per_filter"]
        np.testing.assert_array_equal(step.arrays["filters"], np.full((5, 4), 50, np.float32))


def test_state_snapshot_gives_the_latest_per_filter_step_before_the_latest_step(publisher):
    publisher.publish(Message("structure", {"revision": 0}))
    publisher.publish(Message("step", {"step": 10, "per_filter": True}, {"filters": np.ones((5, 4), np.float32)}))
    for step in range(11, 15):
        publisher.publish(Message("step", {"step": step, "per_filter": False}))
    wait_for(lambda: publisher.queue_length == 0)  # all sent, so in the state snapshot, before the client exists
    with RunClient(publisher.control_endpoint) as client:
        welcome = client.connect()
        state = [client.recv(1.0) for _ in range(welcome["state_count"])]
        assert [(m.type, m.body.get("step")) for m in state if m.type == "step"] == [("step", 10), ("step", 14)]


@pytest.mark.parametrize("per_filter_last", [False, True])
def test_state_snapshot_sends_step_messages_and_batches_in_step_order(publisher, per_filter_last):
    publisher.publish(Message("structure", {"revision": 0}))
    batch = Message("steps", {"first": 11, "last": 14, "rows": [{"step": step} for step in range(11, 15)]})
    per_filter = Message("step", {"step": 15 if per_filter_last else 10, "per_filter": True},
                         {"filters": np.ones((5, 4), np.float32)})
    for message in ([batch, per_filter] if per_filter_last else [per_filter, batch]):
        publisher.publish(message)
    wait_for(lambda: publisher.queue_length == 0)  # all sent, so in the state snapshot, before the client exists
    with RunClient(publisher.control_endpoint) as client:
        welcome = client.connect()
        state = [client.recv(1.0) for _ in range(welcome["state_count"])]
    order = [(m.type, m.body.get("last", m.body.get("step"))) for m in state if m.type in ("step", "steps")]
    assert order == ([("steps", 14), ("step", 15)] if per_filter_last else [("step", 10), ("steps", 14)])


def test_client_skips_telemetry_older_than_its_state_snapshot(publisher):
    publisher.publish(Message("structure", {"revision": 0}))
    with RunClient(publisher.control_endpoint) as client:
        client.connect()
        for step in range(1, 6):
            publisher.publish(Message("step", {"step": step, "per_filter": False}))
        steps = []
        deadline = time.monotonic() + 3
        while len(steps) < 5 and time.monotonic() < deadline:
            message = client.recv(0.1)
            if message is not None and message.type == "step":
                steps.append(message.body["step"])
        assert steps == [1, 2, 3, 4, 5]
        assert client.gaps == 0


def test_replies_on_the_control_socket_leave_no_gaps_in_telemetry(publisher):
    """Each socket numbers its own messages: a welcome to another client and the acks of a command are replies on
    the control socket, and the telemetry stream's numbers stay contiguous (a client counts a missing one as a
    drop, and the dashboard shows it as one)."""
    publisher.publish(Message("structure", {"revision": 0}))
    with RunClient(publisher.control_endpoint) as watcher, RunClient(publisher.control_endpoint) as steerer:
        watcher.connect()
        publisher.publish(Message("step", {"step": 1, "per_filter": False}))
        steerer.connect()                                           # a welcome and a state snapshot, to steerer
        steerer.send_command("pause", {}, command_id="c1")
        queued, _ = receive_until(steerer, lambda m: m.type == "ack" and m.body["status"] == "queued")
        publisher.publish(Message("step", {"step": 2, "per_filter": False}))
        publisher.send_ack(publisher.poll_commands()[0], "done", step=2)   # published, and answered to steerer
        publisher.publish(Message("step", {"step": 3, "per_filter": False}))
        telemetry = []
        deadline = time.monotonic() + 3
        while (not telemetry or telemetry[-1].body.get("step") != 3) and time.monotonic() < deadline:
            message = watcher.recv(0.1)
            if message is not None and message.type in ("step", "ack"):   # not the snapshot's structure, heartbeats
                telemetry.append(message)
        assert [(m.type, m.body.get("step"), m.body.get("status")) for m in telemetry] == [
            ("step", 1, None), ("step", 2, None), ("ack", 2, "done"), ("step", 3, None)]
        assert watcher.gaps == 0
        # the control socket numbers its replies on its own: each client said hello twice (it knew only the control
        # address), so welcomes 1-4, then the queued ack 5 (state snapshots keep their telemetry numbers)
        assert queued.seq == 5
        receive_until(steerer, lambda m: m.type == "ack" and m.body["status"] == "done")
        assert steerer.gaps == 0


def test_connection_file_round_trip_and_client_from_file(tmp_path, publisher):
    info = ConnectionInfo("test-run", publisher.telemetry_endpoint, publisher.control_endpoint)
    path = info.write(tmp_path / "connection.json")
    assert ConnectionInfo.read(tmp_path) == ConnectionInfo.read(path)
    with RunClient(tmp_path) as client:
        assert client.connect()["telemetry"] == publisher.telemetry_endpoint


def test_signed_connection_file_is_private_and_unsigned_clients_are_refused(tmp_path):
    pub = Publisher("signed", key=b"k" * 32).start()
    try:
        path = ConnectionInfo("signed", pub.telemetry_endpoint, pub.control_endpoint, key=(b"k" * 32).hex()).write(
            tmp_path / "c.json")
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with RunClient(path) as client:
            assert client.connect()["run"] == "signed"
        with RunClient(pub.control_endpoint) as unsigned:
            with pytest.raises(ConnectionFailed, match="signature"):
                unsigned.connect(timeout=2)
    finally:
        pub.close()


def test_unknown_server_is_reported_clearly():
    with RunClient("tcp://127.0.0.1:1") as client:
        with pytest.raises(ConnectionFailed, match="cannot reach|no answer"):
            client.connect(timeout=0.5)


def test_version_mismatch_gets_an_error_naming_the_versions(publisher):
    sock = raw_dealer(publisher.control_endpoint)
    sock.send_multipart(Codec().encode(Message("hello", {"req": "h", "versions": [7, 8]})))
    assert sock.poll(3000)
    reply = Codec().decode(sock.recv_multipart())
    assert reply.type == "error" and reply.body["error"] == "unsupported_version"
    assert "[7, 8]" in reply.body["detail"] and "[1]" in reply.body["detail"]
    sock.close()


MALFORMED = [
    [b"garbage"],
    [b"\x81\xa1v\x01", b""],  # a map without type
    [msgpack.packb({"v": 1, "type": "command", "body": {"req": "r", "id": 5, "op": "pause"}}), b""],
    [msgpack.packb({"v": 1, "type": "step", "body": {}}), b""],
    [msgpack.packb({"v": 1, "type": "command", "body": {"req": "r", "id": "x", "op": "pause"},
                    "buffers": [{"name": "a", "dtype": "|O", "shape": [1]}]}), b"", b"12345678"],
]


def test_malformed_requests_get_error_replies_and_change_nothing(publisher):
    sock = raw_dealer(publisher.control_endpoint)
    for frames in MALFORMED:
        sock.send_multipart(frames)
        assert sock.poll(3000), f"no reply to {frames!r}"
        reply = Codec().decode(sock.recv_multipart())
        assert reply.type == "error" and reply.body["error"] in {"bad_frame", "bad_header", "bad_request"}
        assert reply.body["detail"]
    assert publisher.poll_commands() == []
    # the socket still works for a well-formed command afterwards
    sock.send_multipart(Codec().encode(Message("command", {"req": "r", "id": "ok-1", "op": "pause", "args": {}})))
    assert sock.poll(3000)
    assert Codec().decode(sock.recv_multipart()).body["status"] == "queued"
    assert [c["id"] for c in publisher.poll_commands()] == ["ok-1"]
    sock.close()


def test_duplicate_command_ids_are_applied_once_and_answered_again(publisher):
    with RunClient(publisher.control_endpoint) as client:
        client.connect()
        client.send_command("pause", {}, command_id="same")
        receive_until(client, lambda m: m.type == "ack" and m.body["status"] == "queued")
        commands = publisher.poll_commands()
        assert [c["id"] for c in commands] == ["same"]
        publisher.send_ack(commands[0], "done", step=3)
        receive_until(client, lambda m: m.type == "ack" and m.body["status"] == "done")
        client.send_command("pause", {}, command_id="same")
        again, _ = receive_until(client, lambda m: m.type == "ack" and m.body["status"] == "done")
        assert again.body["step"] == 3
        time.sleep(0.2)  # a command that must not arrive: nothing to wait for, so give it the time it would take
        assert publisher.poll_commands() == []


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_stalled_subscriber_bounds_memory_and_drops_are_counted():
    pub = Publisher("stall", send_hwm=10, queue_size=8).start()
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.RCVHWM, 10)
    stalled.connect(pub.telemetry_endpoint)
    time.sleep(0.3)  # ZeroMQ says nothing when a SUB has joined: give it the time to, so it is there to stall
    try:
        before = _rss_mb()
        # a fresh 1 MiB array per message, as the callback makes: an unbounded queue would hold 2 GiB
        accepted = sum(pub.publish(Message("step", {"step": i}, {"filters": np.full(1 << 18, i, np.float32)}))
                       for i in range(2000))
        time.sleep(1.0)  # the I/O thread sends or drops what it was offered: memory is measured after that, not a state
        growth = _rss_mb() - before
        # 2000 MiB were offered; the queues hold at most (8 + 2 × 10) of them
        assert growth < 200, f"RSS grew by {growth:.0f} MiB"
        assert pub.queue_length <= 8 + 4
        assert accepted + pub.drops["telemetry"] == 2000
    finally:
        stalled.close(linger=0)
        pub.close()


def test_recv_with_zero_timeout_still_reads_what_has_arrived(publisher):
    with RunClient(publisher.control_endpoint) as client:
        client.connect()
        while client.recv(0.2) is not None:  # drain the state snapshot
            pass
        publisher.publish(Message("step", {"step": 1, "per_filter": False}))
        time.sleep(0.3)  # the step reaches the client's socket: only recv could tell, and recv(0) is what is tested
        arrived = []   # the step, and maybe a heartbeat (every 0.2 s here) before it
        while (message := client.recv(0)) is not None:
            arrived.append(message.type)
        assert "step" in arrived, arrived


def test_telemetry_waits_for_the_send_interval_but_acks_and_a_half_full_queue_go_at_once():
    """Telemetry is sent on a timer (a wake per message would hand the GIL to the I/O thread mid-step); essential
    messages and a queue filling up wake the thread at once."""
    pub = Publisher("timer", heartbeat_s=30, send_interval=30, queue_size=8).start()
    try:
        with RunClient(pub.control_endpoint) as client:
            client.connect()
            while client.recv(0.2) is not None:  # the state snapshot
                pass
            pub.publish(Message("step", {"step": 1, "per_filter": False}))
            assert client.recv(0.5) is None  # waits for the 30 s interval
            started = time.monotonic()
            pub.publish(Message("ack", {"req": "", "id": "c1", "op": "pause", "status": "done", "step": 1,
                                        "error": None, "result": {}}))
            first, _ = receive_until(client, lambda m: m.type == "ack", timeout=2.0)
            assert time.monotonic() - started < 1.0
            for step in range(2, 5):  # 3 waiting: less than half of queue_size, nothing is sent
                pub.publish(Message("step", {"step": step, "per_filter": False}))
            assert client.recv(0.5) is None
            pub.publish(Message("step", {"step": 5, "per_filter": False}))  # 4 waiting: the thread is woken
            steps = [m.body["step"] for m in receive_until(client, lambda m: m.body.get("step") == 5, 2.0)[1]]
            assert steps == [2, 3, 4, 5]
    finally:
        pub.close()


def test_a_large_snapshot_is_not_kept_for_late_joiners():
    """The state snapshot keeps the latest snapshot only up to 64 MiB: a ResNet-50's would otherwise stay in the
    trainer's memory for the whole run. A smaller one is kept; a larger one after it drops it (it would be stale)."""
    from revacnn.wire.control import MAX_STATE_SNAPSHOT_BYTES, ControlDesk

    codec = Codec("run")
    desk = ControlDesk(codec, lambda: {})
    small = Message("snapshot", {"step": 1}, {"weight/a": np.zeros(1000, np.float32)})
    desk.sent(None, small, codec.encode(small))
    assert "snapshot" in desk._state and desk._state_count() == 1
    large = Message("snapshot", {"step": 2}, {"weight/a": np.zeros(MAX_STATE_SNAPSHOT_BYTES // 4 + 1, np.float32)})
    desk.sent(None, large, codec.encode(large))
    assert "snapshot" not in desk._state and desk._state_count() == 0
