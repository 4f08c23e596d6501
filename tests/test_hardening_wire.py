"""Issue 30, the control socket: replayed ids, malformed header fields, oversized requests, floods and the heartbeat.

Every test talks to a real ``Publisher`` over loopback ROUTER/DEALER (and SUB) sockets.
"""

from __future__ import annotations

import logging
import threading
import time

import msgpack
import pytest
import zmq

from revacnn.wire import control
from revacnn.wire.protocol import Codec, Message
from revacnn.wire.publisher import Publisher

from helpers import wait_for


@pytest.fixture
def publisher():
    pub = Publisher("hardening", heartbeat_s=0.2).start()
    yield pub
    pub.close()


def dealer(endpoint: str, unlimited: bool = False) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if unlimited:  # a flooder that never blocks and never loses a reply on its own side
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    return sock


def request(sock: zmq.Socket, kind: str, body: dict, timeout: float = 3.0) -> Message:
    sock.send_multipart(Codec().encode(Message(kind, body)))
    return reply(sock, timeout)


def reply(sock: zmq.Socket, timeout: float = 3.0) -> Message:
    assert sock.poll(int(timeout * 1000)), "no reply"
    return Codec().decode(sock.recv_multipart())


def raw(header: dict) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), b""]


def command(command_id: str, op: str = "pause", args: dict | None = None, req: str = "r") -> dict:
    return {"req": req, "id": command_id, "op": op, "args": args or {}}


# -- #3: an applied command never applies twice, however many came between -----------------------------------------
def test_replayed_id_beyond_the_ack_window_is_not_applied_again(publisher, monkeypatch):
    monkeypatch.setattr(control, "MAX_REMEMBERED_ACKS", 20)  # the window of full acks, small to keep the test fast
    sock = dealer(publisher.control_endpoint)
    try:
        ids = ["first", "refused", *[f"c{i}" for i in range(50)]]
        for command_id in ids:
            assert request(sock, "command", command(command_id)).body["status"] == "queued"
            (applied,) = wait_for(publisher.poll_commands)
            if command_id == "refused":
                publisher.send_ack(applied, "error", step=5, error="no")
            else:
                publisher.send_ack(applied, "done", step=7)
            assert reply(sock).body["status"] in ("done", "error")
        for command_id, status in (("first", "done"), ("refused", "error"), ("c49", "done")):
            again = request(sock, "command", command(command_id, req="again"))
            assert again.type == "ack" and again.body["status"] == status, again.body
            assert again.body["req"] == "again" and again.body["op"] == "pause"
            assert again.body["step"] == (5 if status == "error" else 7)
            if command_id == "first":  # its full ack was evicted: the reply says it was applied already
                assert again.body["result"].get("already_applied") is True, again.body
        time.sleep(0.2)  # a command that must not arrive: give it the time it would take
        assert publisher.poll_commands() == []
    finally:
        sock.close()


# -- #5: a malformed header field gets bad_header, never internal, and no log ------------------------------------
BAD_VALUES = {"list": [1, 2], "map": {"a": 1}, "ext": msgpack.ExtType(5, b"xy"), "bytes": b"\x00\x01"}
FIELDS = ("v", "type", "run", "seq", "time", "body", "buffers")


def test_header_fields_of_any_wrong_type_get_bad_header_and_no_traceback(publisher, caplog):
    sock = dealer(publisher.control_endpoint)
    caplog.set_level(logging.DEBUG, logger="revacnn")
    try:
        for field in FIELDS:
            for name, bad in BAD_VALUES.items():
                if (field, name) == ("body", "map"):
                    continue  # a map is what a body is
                header = {"v": 1, "type": "state", "run": "", "seq": 1, "time": 1.0, "body": {"req": "h"},
                          "buffers": [], field: bad}
                sock.send_multipart(raw(header))
                answer = reply(sock)
                assert answer.type == "error" and answer.body["error"] == "bad_header", (field, name, answer.body)
                assert field in answer.body["detail"] or name in ("ext", "bytes"), answer.body
        # a buffer entry whose dtype or name is a list or a map
        for entry in ({"name": "a", "dtype": ["<f4"], "shape": [1]}, {"name": "a", "dtype": {"x": 1}, "shape": [1]},
                      {"name": ["a"], "dtype": "<f4", "shape": [1]}):
            sock.send_multipart([msgpack.packb({"v": 1, "type": "state", "body": {"req": "b"}, "buffers": [entry]}),
                                 b"", b"\0" * 4])
            answer = reply(sock)
            assert answer.body["error"] == "bad_header", answer.body
        assert publisher.internal_errors == 0
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        sock.close()


def test_error_replies_echo_req_when_the_header_decoded(publisher):
    sock = dealer(publisher.control_endpoint)
    try:
        assert request(sock, "hello", {"req": "e1", "client": "x"}).body["req"] == "e1"  # no versions
        assert request(sock, "command", {"req": "e2", "op": "pause"}).body["req"] == "e2"  # no id
        assert request(sock, "status", {"req": "e3"}).body["req"] == "e3"  # not a request type
        sock.send_multipart(raw({"v": 1, "type": ["state"], "body": {"req": "e4"}}))
        answer = reply(sock)
        assert (answer.body["error"], answer.body["req"]) == ("bad_header", "e4")
    finally:
        sock.close()


def test_internal_errors_are_logged_at_most_once_per_interval(publisher, caplog, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(publisher.desk, "_send_state", broken)
    caplog.set_level(logging.DEBUG, logger="revacnn")
    sock = dealer(publisher.control_endpoint)
    try:
        for i in range(40):
            answer = request(sock, "state", {"req": f"s{i}"})
            assert (answer.body["error"], answer.body["req"]) == ("internal", f"s{i}")
        assert publisher.internal_errors == 40
        logged = [r for r in caplog.records if r.name.startswith("revacnn.wire")]
        assert len(logged) == 1, [r.getMessage() for r in logged]
    finally:
        sock.close()


# -- #6: bounded request sizes, bounded work per request -----------------------------------------------------------
def big_state(items: int, lists: int = 1) -> list[bytes]:
    junk = [0] * items if lists == 1 else [[0] * items] * lists
    return raw({"v": 1, "type": "state", "body": {"req": "big", "junk": junk}})


def test_a_state_request_with_a_million_element_list_is_refused_quickly():
    # no rate limit here: what is measured is the refusal itself, not the bucket that would drop the request unread
    unlimited = control.ControlLimits(requests_per_s=1e6, request_burst=1_000_000)
    publisher = Publisher("big", control_limits=unlimited).start()
    sock = dealer(publisher.control_endpoint)
    try:
        for frames in (big_state(1_000_000), big_state(65_536, lists=15)):
            assert len(frames[0]) < control.CONTROL_MAX_BYTES
            started = time.perf_counter()
            for _ in range(5):
                sock.send_multipart(frames)
                answer = reply(sock)
                assert answer.type == "error" and answer.body["error"] == "too_large", answer.body
                assert answer.body["req"] == "" or answer.body["req"] == "big"
            assert (time.perf_counter() - started) / 5 < 0.1
    finally:
        sock.close()
        publisher.close()


def test_a_filter_list_of_65536_is_accepted_and_one_longer_refused(publisher):
    sock = dealer(publisher.control_endpoint)
    try:
        args = {"layer": "conv", "filters": list(range(65_536)), "mode": "random"}
        assert request(sock, "command", command("long", "reinit_filters", args)).body["status"] == "queued"
        args["filters"].append(65_536)
        answer = request(sock, "command", command("longer", "reinit_filters", args))
        assert answer.type == "error" and answer.body["error"] == "too_large"
        assert "65536" in answer.body["detail"].replace(",", ""), answer.body
        assert [c["id"] for c in publisher.poll_commands()] == ["long"]
    finally:
        sock.close()


def test_unknown_request_body_fields_are_ignored_without_walking_them(publisher):
    sock = dealer(publisher.control_endpoint)
    try:
        body = {"req": "u", "future_field": [[1.5] * 1000] * 60}
        answer = request(sock, "state", body, timeout=3)
        assert answer.type != "error", answer.body
    finally:
        sock.close()


def test_the_io_thread_keeps_answering_others_while_one_client_sends_huge_requests(publisher, monkeypatch):
    handle, cpu = publisher.desk.handle_safely, []

    def timed(*args):  # the I/O thread's CPU time spent on requests: what it takes from the training thread
        started = time.thread_time()
        handle(*args)
        cpu.append(time.thread_time() - started)

    monkeypatch.setattr(publisher.desk, "handle_safely", timed)
    flooder = dealer(publisher.control_endpoint, unlimited=True)
    other = dealer(publisher.control_endpoint)
    stop = threading.Event()
    frames = big_state(1_000_000)

    def flood():
        while not stop.is_set():
            flooder.send_multipart(frames)
            time.sleep(0.002)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        latencies = []
        for i in range(20):
            started = time.perf_counter()
            answer = request(other, "command", command(f"o{i}"), timeout=5)
            latencies.append(time.perf_counter() - started)
            assert answer.body["status"] == "queued"
        assert max(latencies) < 0.5, latencies
        assert len(cpu) > 40 and sum(cpu) < 0.2, (len(cpu), sum(cpu))
    finally:
        stop.set()
        thread.join()
        flooder.close()
        other.close()


# -- #7: one noisy client cannot starve the others -------------------------------------------------------------------
def test_requests_beyond_the_rate_limit_are_dropped_counted_and_answered_once():
    pub = Publisher("rate", heartbeat_s=0.1, control_limits=control.ControlLimits(requests_per_s=10,
                                                                                    request_burst=20)).start()
    noisy = dealer(pub.control_endpoint, unlimited=True)
    calm = dealer(pub.control_endpoint)
    try:
        for i in range(200):
            noisy.send_multipart(Codec().encode(Message("command", command(f"n{i}"))))
        time.sleep(0.5)
        replies = []
        while noisy.poll(200):
            replies.append(Codec().decode(noisy.recv_multipart()))
        queued = [m for m in replies if m.type == "ack" and m.body["status"] == "queued"]
        limited = [m for m in replies if m.type == "error" and m.body["error"] == "rate_limited"]
        assert 20 <= len(queued) <= 30, len(queued)
        assert len(limited) == 1 and "10 requests/s" in limited[0].body["detail"], limited
        assert len(pub.poll_commands()) == len(queued)
        # another client has a bucket of its own
        assert request(calm, "command", command("calm")).body["status"] == "queued"
        status = wait_for(lambda: pub._status_message().body["control"]["rate_limited"] >= 200 - len(queued) - 5)
        assert status
        assert pub._status_message().body["control"]["rate_limited"] == 200 - len(queued)
    finally:
        noisy.close()
        calm.close()
        pub.close()


def test_big_requests_use_up_a_clients_rate_limit_sooner(publisher):
    sock = dealer(publisher.control_endpoint, unlimited=True)
    try:
        frames = raw({"v": 1, "type": "command", "body": {"req": "b", "id": "big", "op": "x",
                                                          "args": {"v": [0.5] * 65_000}}})
        for _ in range(15):  # 585 kB each: 36 tokens of a burst of 200 (one per 16 KiB, plus one)
            sock.send_multipart(frames)
        time.sleep(0.5)
        replies = []
        while sock.poll(200):
            replies.append(Codec().decode(sock.recv_multipart()))
        answered = [m for m in replies if m.type == "ack"]
        limited = [m for m in replies if m.type == "error" and m.body["error"] == "rate_limited"]
        assert 1 <= len(answered) <= 6 and len(limited) == 1, [m.body for m in replies]
        assert publisher.desk.counts()["rate_limited"] == 15 - len(answered)
    finally:
        sock.close()


def test_a_command_flood_does_not_push_telemetry_out_of_another_watchers_queue():
    pub = Publisher("flood", heartbeat_s=60).start()  # no heartbeat after the first: the watcher reads to the end
    watcher = zmq.Context.instance().socket(zmq.SUB)
    watcher.setsockopt(zmq.LINGER, 0)
    watcher.setsockopt(zmq.SUBSCRIBE, b"")
    watcher.connect(pub.telemetry_endpoint)
    flooder = dealer(pub.control_endpoint, unlimited=True)
    try:
        assert wait_for(lambda: pub.publish(Message("hparams", {})) and watcher.poll(100), timeout=5)  # subscribed
        while watcher.poll(100):
            watcher.recv_multipart()
        for i in range(5000):
            flooder.send_multipart(Codec().encode(Message("command", command(f"f{i}"))), zmq.NOBLOCK)
        answered: list = []
        for step in range(1, 201):  # the training thread: steps, and the final ack of every command it receives
            pub.publish(Message("step", {"step": step}))
            for applied in pub.poll_commands():
                pub.send_ack(applied, "done", step=step)
                answered.append(applied["id"])
            time.sleep(0.005)
        time.sleep(0.5)
        for applied in pub.poll_commands():
            pub.send_ack(applied, "done", step=200)
            answered.append(applied["id"])
        time.sleep(0.5)
        # the watcher reads only now: everything it missed was pushed out of its queue
        received = []
        while watcher.poll(300):
            received.append(Codec().decode(watcher.recv_multipart(), topic=True))
        seqs = [m.seq for m in received]
        gaps = sum(b - a - 1 for a, b in zip(seqs, seqs[1:]))
        assert gaps == 0, (gaps, len(received))
        assert [m.body["step"] for m in received if m.type == "step"] == list(range(1, 201))
        # the flooder gets the final ack of every command that was accepted
        replies = []
        while flooder.poll(300):
            replies.append(Codec().decode(flooder.recv_multipart()))
        queued = {m.body["id"] for m in replies if m.type == "ack" and m.body["status"] == "queued"}
        done = {m.body["id"] for m in replies if m.type == "ack" and m.body["status"] == "done"}
        assert queued and queued == set(answered) == done
        control_counts = pub._status_message().body["control"]
        assert control_counts["acks_unpublished"] > 0 and control_counts["rate_limited"] > 0
    finally:
        watcher.close()
        flooder.close()
        pub.close()


# -- the heartbeat carries the current step ------------------------------------------------------------------------
def test_the_heartbeat_carries_the_step_handed_over_each_batch(publisher):
    watcher = zmq.Context.instance().socket(zmq.SUB)
    watcher.setsockopt(zmq.LINGER, 0)
    watcher.setsockopt(zmq.SUBSCRIBE, b"revacnn.status")
    watcher.connect(publisher.telemetry_endpoint)
    try:
        publisher.set_status(state="running", step=3, epoch=0)
        publisher.progress = (42, 2)  # what the callback sets at the end of every batch
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert watcher.poll(1000)
            status = Codec().decode(watcher.recv_multipart(), topic=True)
            if status.body["step"] == 42:
                assert status.body["epoch"] == 2
                break
        else:
            raise AssertionError("no heartbeat with the current step")
    finally:
        watcher.close()
