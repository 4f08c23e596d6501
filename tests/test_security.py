"""CURVE on both sockets, the client-key allow-list, key files and the CLI, and the bind policy (loopback)."""

from __future__ import annotations

import json
import stat
import time

import pytest
import zmq

from revacnn.cli import main as cli_main
from revacnn.wire.client import ConnectionFailed, RunClient
from revacnn.wire.connection import (
    ConnectionInfo,
    CurveServerKeys,
    allow_key,
    generate_keypair,
    load_keypair,
    load_public_key,
)
from revacnn.wire.protocol import Codec, Message
from revacnn.wire.publisher import Publisher

from helpers import wait_for, wait_for_message


@pytest.fixture
def keys(tmp_path):
    """A trainer keys dir with one allowed client ('laptop') and one client that is not allowed ('mallory')."""
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    generate_keypair(server_dir, "server")
    laptop_public, laptop_secret = generate_keypair(client_dir, "laptop")
    _, mallory_secret = generate_keypair(client_dir, "mallory")
    allow_key(laptop_public, server_dir)
    return {"dir": server_dir, "laptop": laptop_secret, "mallory": mallory_secret, "tmp": tmp_path}


@pytest.fixture
def secure_run(keys):
    curve = CurveServerKeys.from_keys_dir(keys["dir"], create=False)
    pub = Publisher("secure-run", heartbeat_s=0.1, curve=curve).start()
    info = ConnectionInfo("secure-run", pub.telemetry_endpoint, pub.control_endpoint, security="curve",
                          curve_server_key=curve.public.decode())
    path = info.write(keys["tmp"] / "run" / "connection.json")
    yield pub, path, curve
    pub.close()


def test_allowed_client_reads_telemetry_and_steers_over_curve(secure_run, keys):
    pub, path, _ = secure_run
    pub.publish(Message("structure", {"revision": 0}))
    wait_for(lambda: pub.queue_length == 0)  # published before the client exists: it must come with the state snapshot
    with RunClient(path, client_keys=keys["laptop"]) as client:
        welcome = client.connect(timeout=5)
        assert welcome["run"] == "secure-run"
        wait_for_message(client, lambda m: m.type == "structure")
        status = wait_for_message(client, lambda m: m.type == "status")
        assert status.body["security"]["mode"] == "curve" and status.body["security"]["allowed"] == 1
        command_id = client.send_command("pause")
        wait_for_message(client, lambda m: m.type == "ack" and m.body["id"] == command_id)
        commands = wait_for(pub.poll_commands, timeout=2, interval=0.01)
        assert [c["op"] for c in commands] == ["pause"]


def test_client_key_not_allowed_is_refused_clearly_and_changes_nothing(secure_run, keys):
    pub, path, _ = secure_run
    with RunClient(path, client_keys=keys["mallory"]) as client:
        with pytest.raises(ConnectionFailed, match="refused this client's key"):
            client.connect(timeout=3)
    assert pub.security()["denied"] >= 1
    assert pub.poll_commands() == []


def test_plaintext_and_wrong_server_key_clients_get_nothing(secure_run, keys):
    pub, path, curve = secure_run
    info = ConnectionInfo.read(path)
    # a client that does not speak CURVE at all
    with RunClient(info.control) as client:
        with pytest.raises(ConnectionFailed):
            client.connect(timeout=2)
    # raw sockets of a third party: a plain SUB hears nothing, plain DEALER commands are never delivered
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(info.telemetry)
    dealer = context.socket(zmq.DEALER)
    dealer.connect(info.control)
    # and one with a valid but not allowed keypair and the right server key
    mallory = context.socket(zmq.SUB)
    mallory.curve_publickey, mallory.curve_secretkey = load_keypair(keys["mallory"])
    mallory.curve_serverkey = curve.public
    mallory.setsockopt(zmq.SUBSCRIBE, b"")
    mallory.connect(info.telemetry)
    codec = Codec()
    for i in range(5):
        try:
            dealer.send_multipart(codec.encode(Message("command", {"req": "x", "id": f"evil{i}", "op": "stop"})),
                                  flags=zmq.NOBLOCK)
        except zmq.Again:  # no completed connection to queue it on: exactly the point
            pass
        pub.publish(Message("step", {"step": i, "per_filter": False}))
        time.sleep(0.1)  # paces the attempts: each has time to get through, if anything could
    assert not sub.poll(300) and not mallory.poll(10) and not dealer.poll(10)
    assert pub.poll_commands() == []
    for sock in (sub, dealer, mallory):
        sock.close(0)
    context.term()
    # the laptop with the server key of another trainer cannot connect either
    other_public, _ = generate_keypair(keys["tmp"] / "other", "server")
    with RunClient(info.control, client_keys=keys["laptop"], server_key=other_public) as client:
        with pytest.raises(ConnectionFailed):
            client.connect(timeout=2)


def test_key_allowed_while_running_is_picked_up(secure_run, keys):
    _, path, _ = secure_run
    with RunClient(path, client_keys=keys["mallory"]) as client:
        with pytest.raises(ConnectionFailed):
            client.connect(timeout=1.5)
    allow_key(keys["mallory"].with_name("mallory.key"), keys["dir"])
    time.sleep(0.3)  # only a connection shows whether the allow-list changed, and connecting is what is tested
    with RunClient(path, client_keys=keys["mallory"]) as client:
        assert client.connect(timeout=5)["run"] == "secure-run"
    # revoking: new connections are refused again
    assert cli_main(["keys", "revoke", "mallory", "--keys-dir", str(keys["dir"])]) == 0
    time.sleep(0.3)  # as above, for the revocation
    with RunClient(path, client_keys=keys["mallory"]) as client:
        with pytest.raises(ConnectionFailed, match="refused"):
            client.connect(timeout=3)


def test_curve_run_requires_client_keys(secure_run, monkeypatch):
    _, path, _ = secure_run
    monkeypatch.delenv("REVACNN_CLIENT_KEY", raising=False)
    with pytest.raises(ValueError, match="revacnn keys generate"):
        RunClient(path)


def test_connection_file_has_the_server_public_key_never_the_secret(secure_run):
    _, path, curve = secure_run
    text = path.read_text()
    data = json.loads(text)
    assert data["security"] == "curve" and data["curve_server_key"] == curve.public.decode()
    assert curve.secret.decode() not in text


def test_non_loopback_bind_policy(keys, caplog):
    with pytest.raises(ValueError, match="without CURVE"):
        Publisher("r", host="0.0.0.0")
    curve = CurveServerKeys.from_keys_dir(keys["dir"])
    pub = Publisher("r", host="0.0.0.0", curve=curve, heartbeat_s=0.1).start()
    try:
        port = pub.control_endpoint.rsplit(":", 1)[1]
        with RunClient(f"tcp://127.0.0.1:{port}", client_keys=keys["laptop"], server_key=curve.public) as client:
            assert client.connect(timeout=5)["run"] == "r"
    finally:
        pub.close()
    with caplog.at_level("WARNING"):
        Publisher("r", host="0.0.0.0", insecure_bind=True).start().close()
    assert "INSECURE" in caplog.text


def test_wildcard_endpoints_are_rehosted(tmp_path):
    info = ConnectionInfo("r", "tcp://0.0.0.0:5001", "tcp://0.0.0.0:5002", host="gpu-box")
    path = info.write(tmp_path / "c.json")
    client = RunClient(path)
    assert (client.control_endpoint, client.telemetry_endpoint) == ("tcp://gpu-box:5002", "tcp://gpu-box:5001")
    client.close()
    client = RunClient(path, host="10.0.0.7")
    assert client.control_endpoint == "tcp://10.0.0.7:5002"
    client.close()


def test_keys_cli(tmp_path, capsys):
    server, client = tmp_path / "srv", tmp_path / "cli"
    assert cli_main(["keys", "generate", "--out", str(server), "--name", "server"]) == 0
    assert cli_main(["keys", "generate", "--out", str(client), "--name", "laptop"]) == 0
    assert cli_main(["keys", "generate", "--out", str(client), "--name", "laptop"]) == 1  # no silent overwrite
    assert stat.S_IMODE((client / "laptop.key_secret").stat().st_mode) == 0o600
    # allowing from the secret file copies only the public half
    assert cli_main(["keys", "allow", str(client / "laptop.key_secret"), "--keys-dir", str(server)]) == 0
    allowed = (server / "allowed" / "laptop.key").read_text()
    public, secret = load_keypair(client / "laptop.key_secret")
    assert public.decode() in allowed and secret.decode() not in allowed and "secret" not in allowed
    assert load_public_key(server / "allowed" / "laptop.key") == public
    (tmp_path / "junk.key").write_text("not a key")
    assert cli_main(["keys", "allow", str(tmp_path / "junk.key"), "--keys-dir", str(server)]) == 1
    capsys.readouterr()
    assert cli_main(["keys", "list", "--keys-dir", str(server)]) == 0
    assert public.decode() in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["keys", "--help"])
    assert "revacnn keys allow" in capsys.readouterr().out
