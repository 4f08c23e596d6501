"""Issue 30, findings 8-10: the dashboard's Host allow-list (DNS rebinding), revoked CURVE keys losing access at
once (control requests and telemetry), and the IPv6 loopback ``::1``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from browser_support import served_dashboard
from helpers import wait_for, wait_for_message
from revacnn.cli import main as cli_main
from revacnn.wire.client import RunClient
from revacnn.wire.connection import ConnectionInfo, CurveServerKeys, allow_key, generate_keypair
from revacnn.wire.curve_auth import is_loopback
from revacnn.wire.protocol import Message
from revacnn.wire.publisher import Publisher
from revacnn_dash import auth as dash_auth

ROOT = Path(__file__).resolve().parents[1]
EXTRA_HOST = "dash.example.lan"


# -- 8. the dashboard's Host allow-list -----------------------------------------------------------------------------
def test_host_name_is_parsed_from_every_form_of_the_host_header():
    assert dash_auth.host_name("127.0.0.1:8050") == "127.0.0.1"
    assert dash_auth.host_name("LOCALHOST.:8050") == "localhost"
    assert dash_auth.host_name("[::1]:8050") == "::1"
    assert dash_auth.host_name("[::1]") == "::1"
    assert dash_auth.host_name("evil.example") == "evil.example"
    assert dash_auth.host_name("") == ""


def test_only_loopback_ip_literals_and_named_hosts_are_allowed():
    allowed = {"dash.example.lan"}
    for host in ("127.0.0.1:8050", "127.3.4.5", "localhost:1", "[::1]:8050", "Dash.Example.Lan:8050",
                 "192.0.2.7:8050", "[2001:db8::1]:80"):  # an IP literal cannot be rebound by DNS
        assert dash_auth.host_allowed(host, allowed), host
    for host in ("evil.example", "evil.example:8050", "localhost.evil.example", "127.0.0.1.evil.example", "",
                 "[::1", "dash.example.lan.evil"):
        assert not dash_auth.host_allowed(host, allowed), host


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A real revacnn-dash on 127.0.0.1 without a token, allowing one extra name."""
    with served_dashboard(tmp_path_factory.mktemp("logs"), "--allow-host", EXTRA_HOST) as (port, _):
        yield port


def _layout_and_update(port: int, host: str) -> tuple[requests.Response, requests.Response]:
    base = f"http://127.0.0.1:{port}"
    layout = requests.get(base + "/_dash-layout", headers={"Host": host}, timeout=10)
    update = requests.post(base + "/_dash-update-component", headers={"Host": host}, json={}, timeout=10)
    return layout, update


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}"])
def test_a_foreign_host_header_is_refused_with_a_hint(dashboard, host):
    layout, update = _layout_and_update(dashboard, host.format(port=dashboard))
    for response in (layout, update):
        assert response.status_code == 403, response.text
        assert response.headers["Content-Type"].startswith("text/plain")
        assert "--allow-host" in response.text and "evil.example" in response.text


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", EXTRA_HOST + ":{port}"])
def test_loopback_and_allowed_hosts_are_served(dashboard, host):
    layout, update = _layout_and_update(dashboard, host.format(port=dashboard))
    assert layout.status_code == 200 and "props" in layout.json()
    assert update.status_code != 403   # reaches Dash (which rejects the empty request body on its own terms)


def test_allow_host_is_documented_in_help(capsys):
    from revacnn_dash.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--allow-host" in capsys.readouterr().out


# -- 9. revoked keys lose access at once ----------------------------------------------------------------------------
@pytest.fixture
def two_clients(tmp_path):
    """A CURVE run with two allowed clients, 'laptop' (to be revoked) and 'desk'."""
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    generate_keypair(server_dir, "server")
    secrets = {}
    for name in ("laptop", "desk"):
        public, secrets[name] = generate_keypair(client_dir, name)
        allow_key(public, server_dir)
    curve = CurveServerKeys.from_keys_dir(server_dir, create=False)
    pub = Publisher("revoke-run", heartbeat_s=0.1, curve=curve).start()
    info = ConnectionInfo("revoke-run", pub.telemetry_endpoint, pub.control_endpoint, security="curve",
                          curve_server_key=curve.public.decode())
    path = info.write(tmp_path / "run" / "connection.json")
    yield pub, path, server_dir, secrets
    pub.close()


def _drain(client, seconds: float) -> list[Message]:
    received, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = client.recv(0.05)
        if message is not None:
            received.append(message)
    return received


def test_a_revoked_client_loses_control_and_telemetry_at_once(two_clients):
    pub, path, server_dir, secrets = two_clients
    with RunClient(path, client_keys=secrets["laptop"]) as laptop, RunClient(path, client_keys=secrets["desk"]) as desk:
        laptop.connect(timeout=5)
        desk.connect(timeout=5)
        first = laptop.send_command("pause")
        wait_for_message(laptop, lambda m: m.type == "ack" and m.body["id"] == first)
        assert [c["op"] for c in wait_for(pub.poll_commands, timeout=2, interval=0.01)] == ["pause"]

        assert cli_main(["keys", "revoke", "laptop", "--keys-dir", str(server_dir)]) == 0
        time.sleep(2.0)                     # "at once": the trainer notices within a heartbeat or two
        _drain(laptop, 0.3)
        _drain(desk, 0.3)

        pub.publish(Message("structure", {"revision": 7}))
        refused = laptop.send_command("resume")
        assert wait_for_message(desk, lambda m: m.type == "structure").body["revision"] == 7
        heard = _drain(laptop, 1.0)
        assert [m for m in heard if m.type in ("structure", "status")] == []   # no more telemetry
        assert [m for m in heard if m.type == "ack" and m.body.get("id") == refused] == []
        assert pub.poll_commands() == []                                       # its command had no effect

        kept = desk.send_command("resume")
        wait_for_message(desk, lambda m: m.type == "ack" and m.body["id"] == kept)
        assert [c["op"] for c in wait_for(pub.poll_commands, timeout=2, interval=0.01)] == ["resume"]
        wait_for_message(desk, lambda m: m.type == "status")                  # telemetry goes on for the other
    assert pub.security()["allowed"] == 1


def test_a_re_allowed_key_can_connect_again(two_clients, tmp_path):
    pub, path, server_dir, secrets = two_clients
    assert cli_main(["keys", "revoke", "laptop", "--keys-dir", str(server_dir)]) == 0
    wait_for(lambda: pub.security()["allowed"] == 1, timeout=3)
    allow_key(tmp_path / "client" / "laptop.key", server_dir)
    wait_for(lambda: pub.security()["allowed"] == 2, timeout=3)
    with RunClient(path, client_keys=secrets["laptop"]) as laptop:
        laptop.connect(timeout=5)
        command = laptop.send_command("pause")
        wait_for_message(laptop, lambda m: m.type == "ack" and m.body["id"] == command)
        wait_for_message(laptop, lambda m: m.type == "status")


# -- 10. IPv6 loopback ------------------------------------------------------------------------------------------------
def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="IPv6 loopback ::1 is not available on this machine")


def test_ipv6_loopback_is_loopback():
    assert is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("2001:db8::1")


@needs_ipv6
def test_publisher_on_ipv6_loopback_serves_a_client(tmp_path):
    pub = Publisher("v6-run", host="::1", heartbeat_s=0.1).start()
    try:
        assert pub.telemetry_endpoint.startswith("tcp://[::1]:") and pub.control_endpoint.startswith("tcp://[::1]:")
        info = ConnectionInfo("v6-run", pub.telemetry_endpoint, pub.control_endpoint, host="::1")
        path = info.write(tmp_path / "connection.json")
        pub.publish(Message("structure", {"revision": 1}))
        wait_for(lambda: pub.queue_length == 0)
        for target in (path, pub.control_endpoint):   # the connection file, and a bare control address
            with RunClient(target) as client:
                assert client.connect(timeout=5)["run"] == "v6-run"
                wait_for_message(client, lambda m: m.type == "structure")   # the state snapshot (control socket)
                for _ in range(3):   # heartbeats: the snapshot holds one at most, the others came by telemetry
                    wait_for_message(client, lambda m: m.type == "status")
                command = client.send_command("pause")
                wait_for_message(client, lambda m: m.type == "ack" and m.body["id"] == command)
                assert [c["op"] for c in wait_for(pub.poll_commands, timeout=2, interval=0.01)] == ["pause"]
    finally:
        pub.close()



@needs_ipv6
def test_trainer_with_the_callback_on_ipv6_loopback_is_watched_and_steered(tmp_path):
    """ReVACNNCallback(host="::1") in a real Lightning run (tests/remote_trainer.py): the connection file names
    tcp://[::1]:…, and a RunClient gets telemetry and steers the learning rate."""
    trainer = subprocess.Popen([sys.executable, str(ROOT / "tests" / "remote_trainer.py"), "--root", str(tmp_path),
                                "--tiny", "--host", "::1", "--max-steps", "120", "--slow", "0.02"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        connection = next((line.split(" ", 1)[1].strip() for line in trainer.stdout
                           if line.startswith("CONNECTION ")), None)
        assert connection is not None, trainer.stderr.read()[-3000:]
        info = ConnectionInfo.read(connection)
        assert info.control.startswith("tcp://[::1]:") and info.telemetry.startswith("tcp://[::1]:")
        with RunClient(connection) as client:
            client.connect(timeout=20)
            wait_for_message(client, lambda m: m.type in ("step", "steps"), timeout=20)
            command = client.send_command("set_hparams", {"lr": 0.0125})
            done = wait_for_message(client, lambda m: m.type == "ack" and m.body["id"] == command
                                    and m.body["status"] != "queued", timeout=20)
            assert done.body["status"] == "done", done.body
        out, _ = trainer.communicate(timeout=120)
        assert trainer.returncode == 0
        result = next(line for line in out.splitlines() if line.startswith("DONE "))
        assert '"lr": 0.0125' in result
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)
