"""The dashboard's I/O side against a real CURVE Publisher: an allow-listed key goes LIVE and shows the 🔒 CURVE
badge; an unlisted key shows RunClient's refusal text verbatim in the banner; --remote-host rewrites endpoints."""

from __future__ import annotations

import pytest

from revacnn.wire.connection import ConnectionInfo, CurveServerKeys, allow_key, generate_keypair
from revacnn.wire.protocol import Message
from revacnn.wire.publisher import Publisher
from revacnn_dash.views.header import banner_children
from revacnn_dash.data.hub import Hub

from helpers import wait_for


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    generate_keypair(tmp / "server", "server")
    laptop_public, laptop_secret = generate_keypair(tmp / "client", "laptop")
    _, mallory_secret = generate_keypair(tmp / "client", "mallory")
    allow_key(laptop_public, tmp / "server")
    curve = CurveServerKeys.from_keys_dir(tmp / "server", create=False)
    pub = Publisher("curve-run", heartbeat_s=0.2, curve=curve).start()
    pub.publish(Message("structure", {"revision": 0, "layers": []}))
    info = ConnectionInfo("curve-run", pub.telemetry_endpoint, pub.control_endpoint, security="curve",
                          curve_server_key=curve.public.decode())
    path = info.write(tmp / "run" / "connection.json")
    # The same run as a file written on "another machine": endpoints on an address this host does not have.
    far = ConnectionInfo("curve-run", pub.telemetry_endpoint.replace("127.0.0.1", "192.0.2.1"),
                         pub.control_endpoint.replace("127.0.0.1", "192.0.2.1"), security="curve",
                         curve_server_key=curve.public.decode())
    far_path = far.write(tmp / "far" / "connection.json")
    yield {"pub": pub, "path": path, "far": far_path, "laptop": laptop_secret, "mallory": mallory_secret,
           "server_key": curve.public.decode()}
    pub.close()


def _wait(state, predicate, timeout=15.0):
    summary = wait_for(lambda: s if predicate(s := state.summary()) else None, timeout, interval=0.1)
    if summary:
        return summary
    raise AssertionError(f"banner stuck at {state.summary()['conn']}: {state.summary()['conn_message']}")


def _text(children) -> str:
    return " ".join(c if isinstance(c, str) else str(c.children) for c in children)


@pytest.mark.parametrize("target", ["path", "far", "tcp"])
def test_allowed_dashboard_key_goes_live_and_shows_the_curve_badge(curve_run, target):
    options = {"client_keys": str(curve_run["laptop"])}
    if target == "far":
        options["host"] = "127.0.0.1"                                        # --remote-host
        where = str(curve_run["far"])
    elif target == "tcp":
        options["server_key"] = curve_run["server_key"]                      # --server-key for a bare tcp://
        where = curve_run["pub"].control_endpoint
    else:
        where = str(curve_run["path"])
    hub = Hub([where], warm_umap=False, client_options=options)
    try:
        state = next(iter(hub.runs.values()))
        s = _wait(state, lambda s: s["conn"] == "live" and (s["security"] or {}).get("mode") == "curve")
        text = _text(banner_children(s))
        assert text.startswith("LIVE — connected to run curve-run") and "🔒 CURVE" in text
        assert s["security"]["allowed"] == 1
    finally:
        hub.stop()


def test_unlisted_key_shows_the_refusal_verbatim(curve_run):
    hub = Hub([str(curve_run["path"])], warm_umap=False, client_options={"client_keys": str(curve_run["mallory"])})
    try:
        state = next(iter(hub.runs.values()))
        s = _wait(state, lambda s: "refused this client's key" in s["conn_message"])
        text = _text(banner_children(s))
        assert text.startswith("UNREACHABLE — ") and "revacnn keys allow" in text and "🔒" not in text
    finally:
        hub.stop()


def test_curve_run_without_a_client_key_says_how_to_give_one(curve_run, monkeypatch):
    monkeypatch.delenv("REVACNN_CLIENT_KEY", raising=False)
    hub = Hub([str(curve_run["path"])], warm_umap=False)
    try:
        state = next(iter(hub.runs.values()))
        s = _wait(state, lambda s: "client_keys" in s["conn_message"], timeout=5)
        assert "this run uses CURVE" in s["conn_message"] and "cannot read the connection file" not in s["conn_message"]
    finally:
        hub.stop()


def test_banner_shows_the_recording_error():
    s = {"conn": "live", "conn_message": "connected to run r", "security": {"mode": "none"},
         "recording_error": "[Errno 28] No space left on device"}
    text = _text(banner_children(s))
    assert "LIVE — connected to run r" in text and "recording stopped: [Errno 28] No space left on device" in text
    assert "CURVE" not in text


def test_bad_client_key_file_fails_at_start(tmp_path):
    (tmp_path / "x.key_secret").write_text("not a key")
    with pytest.raises(ValueError, match="not a CURVE key file|holds no"):
        Hub([], warm_umap=False, client_options={"client_keys": str(tmp_path / "x.key_secret")})
