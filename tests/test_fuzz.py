"""Fuzzing every decoder and validator that touches socket bytes (hypothesis, derandomised: the same cases in CI).

Counts per run (``EXAMPLES``): raw frames 4,000, structured headers 1,500, request bodies 1,500, a real ROUTER
1,000, the steering wire path 1,500, client sequence numbers 500 — 10,000 generated messages. No crash (only
``ProtocolError`` / error replies), no hang (every request answered within a second), no state change for rejected
commands (model and optimizer state bitwise equal).
"""

from __future__ import annotations

import copy
import math

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revacnn.wire.client import RunClient
from revacnn.wire.protocol import ALLOWED_DTYPES, MESSAGE_TYPES, Codec, Message, ProtocolError, validate_request
from revacnn.wire.control import ControlLimits
from revacnn.wire.publisher import Publisher

EXAMPLES = {"frames": 4000, "headers": 1500, "requests": 1500, "router": 1000, "steering": 1500, "client": 500}


def fuzz(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# -- strategies -------------------------------------------------------------------------------------------------
texts = st.text(max_size=12) | st.sampled_from(["", "naïve ☃", "\u202e\x00", "a" * 300, "net.conv1", "🦄" * 70])
numbers = (st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 2 ** 63, True, False]))
scalars = st.none() | st.booleans() | numbers | texts | st.binary(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    texts | st.integers(-1000, 1000), inner, max_size=4), max_leaves=4)
dtypes = st.sampled_from(sorted(ALLOWED_DTYPES) + ["<f4", "object", "O", "<U4", ">f4", "V8", "", "<c8", "|S3"]) | values
shapes = (st.lists(st.integers(min_value=-2, max_value=2 ** 41), max_size=10) | values)
buffer_entries = st.fixed_dictionaries({"name": texts | values, "dtype": dtypes, "shape": shapes})


@st.composite
def headers(draw):
    header = {
        "v": draw(st.sampled_from([1, 1, 1, 0, 2, -1, True, "1", None, 1.0])),
        "type": draw(st.sampled_from(sorted(MESSAGE_TYPES) + ["", "HELLO", "nope", None])),
        "run": draw(texts | values),
        "seq": draw(st.integers(min_value=-5, max_value=2 ** 64 - 1) | values),
        "time": draw(numbers | values),
        "body": draw(st.dictionaries(texts, values, max_size=5) | values),
        "buffers": draw(st.lists(buffer_entries, max_size=4) | values),
    }
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=3)):
        header.pop(key, None)  # missing fields
    packed = msgpack.packb(header, use_bin_type=True)
    if draw(st.booleans()):
        packed = packed[: draw(st.integers(min_value=0, max_value=len(packed)))]  # truncated
    buffers = draw(st.lists(st.binary(max_size=64), max_size=4))
    return [packed, draw(st.sampled_from([b"", b"00", b"x" * 64])), *buffers]


def check_decoded(codec: Codec, frames: list) -> Message | None:
    try:
        message = codec.decode(frames)
    except ProtocolError as error:
        assert error.code in {"bad_frame", "bad_header", "bad_signature", "unsupported_version", "too_large"}
        assert error.detail
        return None
    assert message.type in MESSAGE_TYPES and message.seq >= 0 and math.isfinite(message.time)
    for array in message.arrays.values():
        assert array.dtype.str in ALLOWED_DTYPES or np.dtype(array.dtype).newbyteorder("<").str in ALLOWED_DTYPES
    return message


# -- Codec.decode -----------------------------------------------------------------------------------------------
@fuzz("frames")
@given(st.lists(st.binary(max_size=96), max_size=6))
def test_decode_arbitrary_frames(frames):
    check_decoded(Codec(max_buffers=64, max_bytes=1 << 20), frames)
    check_decoded(Codec(key=b"k" * 32), frames)


@fuzz("headers")
@given(headers())
def test_decode_structured_headers(frames):
    check_decoded(Codec(max_buffers=64, max_bytes=1 << 20), frames)


def test_huge_declared_sizes_are_refused_without_allocating():
    codec = Codec(max_bytes=1 << 20)
    for shape in ([2 ** 39, 2 ** 39], [2 ** 40 - 1] * 8, [10 ** 9]):
        header = msgpack.packb({"v": 1, "type": "command", "body": {}, "buffers": [
            {"name": "x", "dtype": "<f8", "shape": shape}]})
        with pytest.raises(ProtocolError):
            codec.decode([header, b"", b"\0" * 16])


# -- validate_request -------------------------------------------------------------------------------------------
@fuzz("requests")
@given(st.sampled_from(["hello", "state", "command", "welcome", "step"]),
       st.dictionaries(st.sampled_from(["req", "id", "op", "args", "versions", "client"]) | texts, values,
                       max_size=6))
def test_validate_request_bodies(kind, body):
    message = Message(kind, body)
    try:
        validate_request(message)
    except ProtocolError as error:
        assert error.code == "bad_request" and error.detail
        return
    assert kind in ("hello", "state", "command")
    if kind == "command":
        assert isinstance(body["id"], str) and isinstance(body["op"], str) and isinstance(body.get("args", {}), dict)


# -- the publisher's request handling, through a real ROUTER ----------------------------------------------------
@pytest.fixture(scope="module")
def router_run():
    # each request's handling is fuzzed here, not the per-client rate limit (tests/test_hardening_wire.py)
    publisher = Publisher("fuzz-run", heartbeat_s=30,
                          control_limits=ControlLimits(requests_per_s=1e9, request_burst=10 ** 9)).start()
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(publisher.control_endpoint)
    yield publisher, dealer
    dealer.close(0)
    context.term()
    publisher.close()


@fuzz("router")
@given(st.one_of(headers(), st.lists(st.binary(max_size=64), min_size=1, max_size=5),
                 st.builds(lambda body: Codec().encode(Message("command", body)),
                           st.fixed_dictionaries({"req": texts, "id": texts | values, "op": texts | values,
                                                  "args": st.dictionaries(texts, values, max_size=3) | values}))))
def test_every_request_through_a_real_router_is_answered(router_run, frames):
    publisher, dealer = router_run
    while dealer.poll(0):
        dealer.recv_multipart()  # leftovers (state snapshots after a hello)
    dealer.send_multipart(frames)
    assert dealer.poll(2000), "no answer within 2 s"
    reply = Codec().decode(dealer.recv_multipart())
    assert reply.type in ("error", "ack", "welcome")
    if reply.type == "error":
        assert reply.body["error"] and reply.body["detail"]
    for command in publisher.poll_commands():  # only validated commands reach the trainer
        assert isinstance(command["id"], str) and isinstance(command["op"], str) and isinstance(command["args"], dict)
    assert publisher.internal_errors == 0


def test_router_survives_fuzzing_and_replays_are_applied_once(router_run):
    publisher, dealer = router_run
    publisher.poll_commands()
    codec = Codec()
    for seq in (5, 5, 3, 10 ** 12, 1):  # replayed and out-of-order sequence numbers, one command id
        dealer.send_multipart(codec.encode(Message("command", {"req": "r", "id": "same-id", "op": "pause"}, seq=seq)))
        assert dealer.poll(2000)
        assert Codec().decode(dealer.recv_multipart()).body["id"] == "same-id"
    assert [command["id"] for command in publisher.poll_commands()] == ["same-id"]
    with RunClient(publisher.control_endpoint) as client:  # still alive and speaking the protocol
        assert client.connect(timeout=5)["run"] == "fuzz-run"


# -- SteeringEngine.apply through the callback's wire path ------------------------------------------------------
OPS = ["freeze", "unfreeze", "set_hparams", "widen", "remove_filters", "insert_layer", "remove_layer",
       "reinit_filters", "pause", "", "drop_table", "🦄"]
FIELDS = ["layer", "layers", "filters", "count", "init", "split", "seed", "lr", "momentum", "weight_decay", "groups",
          "after", "batchnorm", "mode", "neighbours", "distances", "values"]
LAYERS = st.sampled_from(["conv1", "conv2", "conv3", "fc", "net", "", "conv9", "conv1.weight", "ç", "conv1 "])
field_values = (LAYERS | st.lists(LAYERS, max_size=3) | st.lists(st.integers(-3, 6), max_size=4) | numbers
                | st.sampled_from(["net2net", "random", "even", "neighbours", "values"]) | values)


def _fresh_steering():
    from revacnn.demo.models import ReVACNNNet
    from revacnn.steering import SteeringEngine

    torch.manual_seed(0)
    module = ReVACNNNet((4, 4, 4), in_channels=1, image_size=8)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(4, 1, 8, 8)
    module(x).sum().backward()
    optimizer.step()
    engine = SteeringEngine(module, [optimizer], example_input=x)
    return module, optimizer, engine


@pytest.fixture(scope="module")
def steering():
    """A mutable holder: an example whose command was accepted replaces its contents with a fresh model."""
    return list(_fresh_steering())


def _state(module, optimizer):
    return ({k: v.clone() for k, v in module.state_dict().items()}, copy.deepcopy(optimizer.state_dict()))


def _assert_equal(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for key, value in oa["state"][i].items():
            assert torch.equal(value, ob["state"][i][key]) if torch.is_tensor(value) else value == ob["state"][i][key]


@fuzz("steering")
@given(st.sampled_from(OPS) | texts, st.dictionaries(st.sampled_from(FIELDS) | texts, field_values, max_size=4))
def test_steering_commands_from_the_wire_are_answered_and_rejected_ones_change_nothing(steering, op, args):
    module, optimizer, engine = steering
    # the wire path: encode → ROUTER bytes → decode → validate_request → the publisher's command dict → engine
    frames = Codec().encode(Message("command", {"req": "q", "id": "c1", "op": op, "args": args}))
    try:
        request = Codec(max_buffers=64, max_bytes=1 << 20).decode(frames)
        validate_request(request)
    except ProtocolError:
        return  # answered with an error by the publisher (tested above); never reaches the engine
    body = request.body
    before = _state(module, optimizer)
    ack = engine.apply({"id": body["id"], "op": body["op"], "args": body.get("args", {})})
    assert isinstance(ack, dict) and isinstance(ack.get("ok"), bool)
    msgpack.packb(ack)  # an ack is always sendable
    if not ack["ok"]:
        assert isinstance(ack["error"], str) and ack["error"]
        _assert_equal(before, _state(module, optimizer))
    else:  # a valid command changed the model: start the next example from a fresh one
        engine.close()
        steering[:] = _fresh_steering()


# -- the client's view of replayed and out-of-order telemetry ---------------------------------------------------
class _FakeSocket:
    def __init__(self, frames):
        self.frames = frames

    def recv_multipart(self, copy=False):
        return self.frames


@fuzz("client")
@given(st.lists(st.integers(min_value=0, max_value=2 ** 63), min_size=1, max_size=30), st.booleans())
def test_client_sequence_numbers_replayed_and_out_of_order(seqs, garbage):
    client = RunClient("tcp://127.0.0.1:9")
    try:
        fake = _FakeSocket(None)
        client._sub = fake
        codec = Codec("r")
        for seq in seqs:
            fake.frames = ([b"revacnn.step", b"\xc1", b""] if garbage else
                           codec.encode(Message("step", {"step": seq}, seq=seq), topic=True))
            client._read(fake)
        assert client.gaps >= 0 and len(client._queue) <= len(seqs)
        assert client.bad_messages == (len(seqs) if garbage else 0)
    finally:
        client._sub = None
        client.close()
