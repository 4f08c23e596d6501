"""The Codec: round trips, and rejection of every malformed message with the right error code."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from revacnn.wire.protocol import Codec, Message, ProtocolError, validate_request


def frames_of(header: dict, *buffers: bytes, signature: bytes = b"") -> list[bytes]:
    return [msgpack.packb(header), signature, *buffers]


def header(**overrides):
    base = {"v": 1, "type": "command", "run": "r", "seq": 1, "time": 1.0,
            "body": {"req": "1", "id": "c1", "op": "pause", "args": {}}, "buffers": []}
    base.update(overrides)
    return base


def test_round_trip_keeps_values_dtypes_and_shapes():
    codec = Codec("run-a")
    arrays = {"f": np.arange(12, dtype=np.float32).reshape(3, 4), "h": np.array([1.5, -2], dtype=np.float16),
              "i": np.array([[-3, 7]], dtype=np.int16), "b": np.array([True, False]), "e": np.zeros((0, 3), np.float32)}
    message = Message("step", {"step": 7, "loss": 0.25, "metrics": {"acc": 0.5}}, arrays)
    decoded = codec.decode(codec.encode(message, topic=True), topic=True)
    assert (decoded.type, decoded.run, decoded.seq, decoded.body) == ("step", "run-a", 1, message.body)
    for name, array in arrays.items():
        assert decoded.arrays[name].dtype == array.dtype and decoded.arrays[name].shape == array.shape
        np.testing.assert_array_equal(decoded.arrays[name], array)


def test_big_endian_arrays_arrive_little_endian_with_same_values():
    codec = Codec("r")
    array = np.arange(5, dtype=">f4")
    decoded = codec.decode(codec.encode(Message("step", {}, {"x": array})))
    assert decoded.arrays["x"].dtype.str == "<f4"
    np.testing.assert_array_equal(decoded.arrays["x"], [0, 1, 2, 3, 4])


def test_sequence_numbers_increase_per_codec():
    codec = Codec("r")
    seqs = [codec.decode(codec.encode(Message("status", {}))).seq for _ in range(3)]
    assert seqs == [1, 2, 3]


def test_signed_messages_verify_and_tampering_is_caught():
    signer = Codec("r", key=b"secret")
    frames = signer.encode(Message("step", {"step": 1}, {"x": np.ones(3, np.float32)}))
    assert Codec("r", key=b"secret").decode(frames).body == {"step": 1}
    tampered = list(frames)
    tampered[2] = np.full(3, 2, np.float32).tobytes()
    with pytest.raises(ProtocolError) as error:
        Codec("r", key=b"secret").decode(tampered)
    assert error.value.code == "bad_signature"
    with pytest.raises(ProtocolError, match="bad_signature"):
        Codec("r", key=b"other").decode(frames)


BAD = [
    ("one frame", [msgpack.packb(header())], "bad_frame"),
    ("not msgpack", [b"\xc1\xc1", b""], "bad_header"),
    ("header is a list", [msgpack.packb([1, 2]), b""], "bad_header"),
    ("version missing", frames_of(header(v=None)), "bad_header"),
    ("version 99", frames_of(header(v=99)), "unsupported_version"),
    ("unknown type", frames_of(header(type="explode")), "bad_header"),
    ("body not a map", frames_of(header(body=[1])), "bad_header"),
    ("NaN in body", frames_of(header(body={"lr": float("nan")})), "bad_header"),
    ("negative seq", frames_of(header(seq=-1)), "bad_header"),
    ("inf time", frames_of(header(time=float("inf"))), "bad_header"),
    ("buffer count mismatch", frames_of(header(), b"xx"), "bad_header"),
    ("dtype object", frames_of(header(buffers=[{"name": "a", "dtype": "|O", "shape": [1]}]), b"\0" * 8),
     "bad_header"),
    ("dtype big endian", frames_of(header(buffers=[{"name": "a", "dtype": ">f4", "shape": [1]}]), b"\0" * 4),
     "bad_header"),
    ("size mismatch", frames_of(header(buffers=[{"name": "a", "dtype": "<f4", "shape": [3]}]), b"\0" * 8),
     "bad_frame"),
    ("huge declared shape", frames_of(header(buffers=[{"name": "a", "dtype": "<f8", "shape": [1 << 39, 4]}]),
                                      b"\0" * 8), "bad_frame"),
    ("negative dim", frames_of(header(buffers=[{"name": "a", "dtype": "<f4", "shape": [-1]}]), b""), "bad_header"),
    ("duplicate names", frames_of(header(buffers=[{"name": "a", "dtype": "|u1", "shape": [1]}] * 2), b"x", b"y"),
     "bad_header"),
    ("bool as shape", frames_of(header(buffers=[{"name": "a", "dtype": "|u1", "shape": [True]}]), b"x"),
     "bad_header"),
]


@pytest.mark.parametrize("frames, code", [(frames, code) for _, frames, code in BAD], ids=[b[0] for b in BAD])
def test_malformed_messages_are_rejected_with_their_code(frames, code):
    with pytest.raises(ProtocolError) as error:
        Codec("r").decode(frames)
    assert error.value.code == code


def test_too_many_buffers_and_too_many_bytes_are_refused():
    codec = Codec("r", max_buffers=2, max_bytes=100)
    table = [{"name": str(i), "dtype": "|u1", "shape": [1]} for i in range(3)]
    with pytest.raises(ProtocolError, match="too_large"):
        codec.decode(frames_of(header(buffers=table), b"a", b"b", b"c"))
    with pytest.raises(ProtocolError, match="too_large"):
        codec.decode(frames_of(header(buffers=[{"name": "a", "dtype": "|u1", "shape": [200]}]), b"x" * 200))


@pytest.mark.parametrize("body, fragment", [
    ({"req": "1", "op": "pause", "args": {}}, "'id'"),
    ({"req": "1", "id": "", "op": "pause"}, "'id'"),
    ({"req": "1", "id": "x" * 65, "op": "pause"}, "'id'"),
    ({"req": "1", "id": "c", "op": 3}, "'op'"),
    ({"req": "1", "id": "c", "op": "pause", "args": [1]}, "'args'"),
    ({"req": 5, "id": "c", "op": "pause"}, "'req'"),
])
def test_command_requests_are_validated(body, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        validate_request(Message("command", body))


def test_hello_needs_integer_versions():
    with pytest.raises(ProtocolError, match="versions"):
        validate_request(Message("hello", {"req": "1", "versions": ["1"]}))
    validate_request(Message("hello", {"req": "1", "versions": [1]}))
