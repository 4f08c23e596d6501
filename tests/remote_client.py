"""The other host of tests/test_security_netns.py (not a test module): an allowed client steers, a third party tries.

    python tests/remote_client.py CONNECTION_FILE ALLOWED_KEY_SECRET INTRUDER_KEY_SECRET

Prints one JSON line with what each side saw.
"""

from __future__ import annotations

import json
import sys
import time

import zmq

from revacnn.wire.client import ConnectionFailed, RunClient
from revacnn.wire.connection import ConnectionInfo, load_keypair, load_public_key
from revacnn.wire.protocol import Codec, Message


def intruder(info: ConnectionInfo, secret_file: str) -> dict:
    """A third party with a real keypair (not allowed) and with no CURVE at all: listens and sends commands."""
    seen = {"refused": "", "plain_refused": "", "telemetry_frames": 0, "replies": 0}
    with RunClient(info.control, client_keys=secret_file, server_key=info.curve_server_key) as client:
        try:
            client.connect(timeout=3)
        except ConnectionFailed as error:
            seen["refused"] = str(error)
    with RunClient(info.control) as client:
        try:
            client.connect(timeout=2)
        except ConnectionFailed as error:
            seen["plain_refused"] = str(error)
    context = zmq.Context()
    sockets = []
    for curve in (False, True):
        sub, dealer = context.socket(zmq.SUB), context.socket(zmq.DEALER)
        for sock in (sub, dealer):
            sock.setsockopt(zmq.LINGER, 0)
            if curve:
                sock.curve_publickey, sock.curve_secretkey = load_keypair(secret_file)
                sock.curve_serverkey = load_public_key(info.curve_server_key)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(info.telemetry)
        dealer.connect(info.control)
        sockets += [sub, dealer]
    codec = Codec()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        for sock in sockets[1::2]:
            try:
                sock.send_multipart(codec.encode(Message("command", {
                    "req": "x", "id": f"intruder-{time.monotonic()}", "op": "set_hparams", "args": {"lr": 0.5}})),
                    flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        for index, sock in enumerate(sockets):
            while sock.poll(50):
                sock.recv_multipart()
                seen["telemetry_frames" if index % 2 == 0 else "replies"] += 1
    for sock in sockets:
        sock.close(0)
    context.term()
    return seen


def steps_in(message) -> int:
    """How many training steps' scalars a telemetry message carries."""
    if message is None:
        return 0
    return 1 if message.type == "step" else len(message.body["rows"]) if message.type == "steps" else 0


def main() -> None:
    connection, allowed, intruder_key = sys.argv[1:4]
    info = ConnectionInfo.read(connection)
    result = {"steps": 0, "acks": {}, "host_endpoint": info.control}
    with RunClient(connection, client_keys=allowed) as client:
        client.connect(timeout=20)
        deadline = time.monotonic() + 60
        while result["steps"] < 5 and time.monotonic() < deadline:
            message = client.recv(0.2)
            result["steps"] += steps_in(message)
        lr_id = client.send_command("set_hparams", {"lr": 0.01})
        result["intruder"] = intruder(info, intruder_key)
        stop_id = None
        while time.monotonic() < deadline:
            message = client.recv(0.2)
            if message is None:
                continue
            result["steps"] += steps_in(message)
            if message.type == "ack" and message.body["status"] != "queued":
                result["acks"][message.body["op"]] = message.body["status"]
                if message.body["id"] == lr_id and stop_id is None:
                    stop_id = client.send_command("stop")
            if message.type == "status":
                result["security"] = message.body.get("security")
                if message.body.get("state") in ("stopped", "finished"):
                    result["final_state"] = message.body["state"]
                    break
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
