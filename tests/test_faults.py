"""Faults with real processes (CPU): each ends with "nothing lost, training unaffected".

Trainers are tests/remote_trainer.py (a real Lightning run of the demo CNN on 8×8 digits). Training is
deterministic, so a run whose client was killed ends with the same model/optimizer digest as an undisturbed one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from revacnn.wire.client import ConnectionFailed, RunClient
from revacnn.recording import open_run

from helpers import quiet_trainer, wait_for

HERE = Path(__file__).parent
PY = sys.executable


def start_trainer(root: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([PY, str(HERE / "remote_trainer.py"), "--root", str(root), "--tiny", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("CONNECTION "):
            return process, Path(line.split(" ", 1)[1].strip())
    raise AssertionError(f"trainer in {root} did not start (rc {process.wait()})")


def finish(process: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0
    return json.loads(next(line for line in out.splitlines() if line.startswith("DONE "))[5:])


def assert_every_step_recorded(run_dir: Path, last: int) -> None:
    steps = open_run(run_dir).scalars()["step"]
    np.testing.assert_array_equal(steps, np.arange(1, last + 1))


CLIENT = textwrap.dedent("""
    import sys, time
    from revacnn.wire.client import RunClient
    started = time.monotonic()
    with RunClient(sys.argv[1]) as client:
        client.connect(timeout=10)
        while True:
            message = client.recv(0.5)
            if message is not None and message.type in ("step", "steps"):
                for body in message.body["rows"] if message.type == "steps" else [message.body]:
                    print(f"STEP {body['step']} {time.monotonic() - started:.3f}", flush=True)
""")


def test_client_killed_and_restarted_mid_run(tmp_path):
    reference, _ = start_trainer(tmp_path / "reference", "--max-steps", "200", "--slow", "0.01")
    trainer, connection = start_trainer(tmp_path / "run", "--max-steps", "200", "--slow", "0.01")
    rejoin = []
    try:
        for generation in range(2):
            client = subprocess.Popen([PY, "-c", CLIENT, str(connection)], stdout=subprocess.PIPE, text=True)
            first = client.stdout.readline().split()
            assert first and first[0] == "STEP", "the client got no step"
            rejoin.append(float(first[2]))
            for _ in range(10):
                client.stdout.readline()
            client.send_signal(signal.SIGKILL)  # a dashboard that crashes, mid-run
            client.wait(10)
        done, undisturbed = finish(trainer), finish(reference)
    finally:
        for process in (trainer, reference):
            if process.poll() is None:
                process.kill()
    # the new client (a fresh process: imports, CURVE-less connect, state snapshot) rejoins within 2 s
    assert max(rejoin) < 2.0, rejoin
    assert done["step"] == 200 and done["digest"] == undisturbed["digest"]  # training unaffected
    assert_every_step_recorded(connection.parent, 200)  # nothing lost


def test_trainer_sigkill_client_sees_heartbeats_stop(tmp_path):
    trainer, connection = start_trainer(tmp_path / "run", "--max-steps", "100000", "--slow", "0.01",
                                        "--filters-every", "1")
    seen_at: dict[int, float] = {}
    with RunClient(connection) as client:
        client.connect(timeout=20)
        until = time.monotonic() + 3
        while time.monotonic() < until:
            message = client.recv(0.1)
            if message is not None and message.type == "step":
                seen_at[message.body["step"]] = time.monotonic()
        killed_at = time.monotonic()
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        while client.recv(0.1) is not None:
            pass
        # it never said goodbye (finished, stopped or failed) … ; the kill may land in a validation
        assert client.last_state in ("running", "validating")
        while client.silent_for() < 3.0 and time.monotonic() < killed_at + 10:
            client.recv(0.2)
        assert client.silent_for() >= 3.0  # … and heartbeats (1 s) stopped: a UI shows the run as stopped
        with pytest.raises(ConnectionFailed, match="not reachable"):
            client.send_command("pause")
    steps = open_run(connection.parent).scalars()["step"]
    must_have = max(step for step, at in seen_at.items() if at <= killed_at - 1.0)
    assert steps.max() >= must_have
    np.testing.assert_array_equal(steps, np.arange(1, steps.max() + 1))


STALLED = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from revacnn.wire.protocol import Message
    from revacnn.wire.publisher import Publisher

    def rss():
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024

    pub = Publisher("stalled", heartbeat_s=0.2).start()
    print(pub.control_endpoint, flush=True)
    sys.stdin.readline()                        # the stalled client is connected
    figures = {"rss_start_mb": rss()}
    filters = np.ones((5, 1500), np.float32)    # 1,500 filters: 30 kB per step
    snapshot = {f"weight/l{i}": np.ones((64, 64, 3, 3), np.float32) for i in range(8)}  # 1.2 MB per snapshot
    started = time.monotonic()
    for step in range(1, 10001):
        pub.publish(Message("step", {"step": step, "per_filter": True}, {"filters": filters}))
        if step % 50 == 0:
            pub.publish(Message("snapshot", {"step": step}, snapshot))
        if step == 1000:
            figures["rss_1k_mb"] = rss()
        time.sleep(0.0002)                      # paces the steps as a fast trainer makes them
    figures["seconds"] = time.monotonic() - started
    time.sleep(0.5)                             # the I/O thread sends or drops the last ones: memory is read after
    figures["rss_end_mb"] = rss()
    figures["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["queue_drops"] = pub.drops["telemetry"]
    figures["sent"] = pub.sent
    print(json.dumps(figures), flush=True)
    sys.stdin.readline()
    pub.close()
""")


def test_stalled_subscriber_for_10k_steps_keeps_trainer_memory_bounded(tmp_path):
    """The publishing side of a run (the part that holds telemetry) under a client that reads nothing for 10k steps."""
    server = subprocess.Popen([PY, "-c", STALLED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = server.stdout.readline().strip()
        with RunClient(endpoint) as client:
            client.connect(timeout=10)
            server.stdin.write("go\n")
            server.stdin.flush()
            figures = json.loads(server.stdout.readline())  # the client read nothing meanwhile: stalled
            (tmp_path / "figures.json").write_text(json.dumps(figures))
            print("stalled-subscriber figures:", figures)
            latest = None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # what was queued before the queues filled, then a heartbeat
                message = client.recv(0.3)
                if message is None and latest is not None:
                    break
                if message is not None and message.type == "step":
                    latest = message.body["step"]
            assert latest < 10000  # the rest was dropped for this subscriber …
            client.request_state()  # … and the clone pattern brings it up to date at once
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and latest < 9900:
                message = client.recv(0.3)
                if message is not None and message.type == "step":
                    latest = message.body["step"]
            server.stdin.write("end\n")
            server.stdin.flush()
            server.wait(20)
    finally:
        if server.poll() is None:
            server.kill()
    # bounded: ZeroMQ's per-subscriber queue (SNDHWM 100) holds at most ~100 messages, whatever the stall
    # Steady state is what "bounded" means: buffering the whole stream would add ~540 MB (10k × 30 kB + 200 × 1.2 MB).
    assert figures["rss_end_mb"] - figures["rss_1k_mb"] < 150, figures
    # The peak is recorded, not asserted: it is 120 MB in isolation and under CPU load, but one full-suite run on a
    # loaded 2-core machine saw a transient 840 MB — more than buffering everything would take, so not queue growth
    # (see benchmarks/RESULTS.md); the end-of-run figure above stayed at 47 MB in that run too.
    # drops are counted on the way: the client's sequence gaps say how many messages it missed
    # (the last few steps can be dropped by the trainer's own bounded queue: counted in queue_drops / status)
    assert latest >= 9900 and client.gaps > 1000


def test_commands_during_validation_checkpoint_duplicates_and_after_the_end(tmp_path):
    trainer, connection = start_trainer(
        tmp_path / "run", "--max-steps", "140", "--slow", "0.02", "--val-every", "60", "--slow-val", "0.5",
        "--checkpoint-every", "50", "--slow-checkpoint", "1.0")
    saving = tmp_path / "run" / "saving"
    sent: dict[str, tuple[str, int]] = {}
    acks: dict[str, dict] = {}
    with RunClient(connection) as client:
        client.connect(timeout=20)
        state, step = None, 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            message = client.recv(0.02)
            if message is not None:
                step = message.body.get("step") or step
                if message.type == "status":
                    state = message.body["state"]
                    if state in ("finished", "stopped"):
                        break
                if message.type == "ack" and message.body["status"] != "queued":
                    acks.setdefault(message.body["id"], message.body)
            if state == "validating" and "val" not in sent:
                sent["val"] = (client.send_command("set_hparams", {"lr": 0.015}, command_id="during-val"), step)
            if saving.exists() and "ckpt" not in sent:
                sent["ckpt"] = (client.send_command("set_hparams", {"weight_decay": 0.001},
                                                    command_id="during-ckpt"), step)
            if "val" in sent and "dup" not in sent and "during-val" in acks:
                sent["dup"] = (client.send_command("set_hparams", {"lr": 0.5}, command_id="during-val"), step)
        done = finish(trainer)
        assert client.last_state == "finished"
        with pytest.raises(ConnectionFailed, match="finished"):  # a clear answer for a finished run
            client.send_command("pause")
    assert set(sent) == {"val", "ckpt", "dup"}, sent
    assert acks["during-val"]["status"] == "done" and acks["during-ckpt"]["status"] == "done"
    assert acks["during-val"]["step"] >= sent["val"][1] and acks["during-ckpt"]["step"] >= sent["ckpt"][1]
    # the duplicate id was answered with the first ack and never applied: lr stays 0.015, not 0.5
    assert done["lr"] == pytest.approx(0.015) and done["step"] == 140
    log = [entry for entry in open_run(connection.parent).steering_log() if entry.get("status") == "done"]
    assert sorted(entry["id"] for entry in log) == ["during-ckpt", "during-val"]  # each applied once
    import torch  # every checkpoint saved while commands arrived loads

    for checkpoint in sorted((tmp_path / "run" / "ckpt").glob("*.ckpt")):
        assert "state_dict" in torch.load(checkpoint, weights_only=False)
    assert_every_step_recorded(connection.parent, 140)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", f"tmpfs-{uuid.uuid4().hex[:6]}",
                                            str(mount)], capture_output=True).returncode != 0:
        message = "cannot mount a small tmpfs here (needs root and mount)"
        if os.environ.get("CI"):  # CI runs as root on a machine where this works: never pass by skipping
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _remove_while_written(path: Path) -> None:
    """``rmtree`` of a directory a live recorder keeps adding files to: a file made between one pass's listing and
    its ``rmdir`` fails that pass ("Directory not empty"); a later one removes it."""
    for _ in range(50):
        try:
            shutil.rmtree(path)
            return
        except OSError:
            time.sleep(0.02)  # paces the retries: the recorder adds its next file in the meantime
    shutil.rmtree(path)


def test_recording_disk_full_and_directory_vanishing(tmp_path, small_disk):
    # without the disk budget, which would keep the recording from ever filling the disk: the error path itself
    full, full_dir = start_trainer(tmp_path / "full", "--max-steps", "250", "--run-dir", str(small_disk / "rec"),
                                   "--filters-every", "1", "--snapshot-every", "10", "--no-disk-budget")
    gone, gone_dir = start_trainer(tmp_path / "gone", "--max-steps", "250", "--slow", "0.005")
    statuses = []
    with RunClient(gone_dir) as client:
        client.connect(timeout=20)
        time.sleep(1.0)  # the run records for a while first: the directory must vanish mid-run, not before it
        _remove_while_written(gone_dir.parent)  # the recording's directory vanishes mid-run
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = client.recv(0.2)
            if message is not None and message.type == "status":
                statuses.append(message.body)
                if message.body["state"] == "finished":
                    break
    full_done, gone_done = finish(full), finish(gone)
    # training goes on to the end in both cases; the error is stated
    # a disk that fills: the recording's free-space check drops what would not fit and says so in ``disk`` (or, where
    # a write still meets a full disk, the recording stops with the error)
    from revacnn.recording.reader import open_run

    assert full_done["step"] == 250
    if "No space left" not in (full_done["recording_error"] or ""):
        dropped = open_run(small_disk / "rec").dropped()
        reasons = {entry.get("reason") for entries in dropped.values() for entry in entries}
        assert "free space" in reasons, dropped
    assert gone_done["step"] == 250 and gone_done["recording_error"]
    assert any("recording_error" in body for body in statuses)  # and shown to every client
    # never a corrupt log: what reached the full disk reads back as a clean prefix
    steps = open_run(full_dir.parent).scalars()["step"]
    np.testing.assert_array_equal(steps, np.arange(1, len(steps) + 1))


def test_an_internal_error_in_telemetry_stops_telemetry_not_the_training(tmp_path, monkeypatch):
    """A fault in the callback's own measuring (here injected into the third per-filter measure) used to end the
    user's run with it. Now telemetry stops, with a warning and ``telemetry_error`` in the heartbeat, and the
    training goes on to its end with steering still working."""
    import pytorch_lightning as pl

    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
    from revacnn.telemetry.probes import FilterProbe

    measured = []
    original = FilterProbe.measure

    def measure_failing_the_third_time(self):
        if not self.armed:  # the probe's warm-up at the fit's start, before any step: not a step's measure
            return original(self)
        measured.append(True)
        if len(measured) == 3:
            raise RuntimeError("injected fault")
        return original(self)

    monkeypatch.setattr(FilterProbe, "measure", measure_failing_the_third_time)
    callback = ReVACNNCallback(filters_every=1, snapshot_every=2)

    class SteerAfterTheFault(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                with RunClient(callback.connection_file) as client:
                    client.connect()
                    client.send_command("set_hparams", {"lr": 0.01})
                    wait_for(lambda: callback.publisher._commands, timeout=5, interval=0.01)

    trainer = quiet_trainer(max_steps=8, limit_val_batches=1, val_check_interval=4, num_sanity_val_steps=0,
                            callbacks=[callback, SteerAfterTheFault()], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"telemetry stopped after an internal error \(RuntimeError: injected fault\)"):
        trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.05), DigitsDataModule(batch_size=16))
    assert trainer.global_step == 8 and len(measured) == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.01
    run = open_run(callback.run_dir)
    assert run.status()["state"] == "finished"
    assert run.status()["telemetry_error"] == "RuntimeError: injected fault"
    np.testing.assert_array_equal(run.scalars()["step"], [1])      # read before the fault; step 2 was not finished
    assert run.snapshot_steps() == [1, 2] and len(run.val_predictions()["steps"]) == 0
    assert [(entry["op"], entry["status"]) for entry in run.steering_log()] == [("set_hparams", "done")]
    from revacnn_dash.views.header import banner_children
    from revacnn_dash.data.hub import Hub

    hub = Hub([], logdir=str(tmp_path), warm_umap=False)      # and the dashboard says so in its banner
    try:
        hub.scan_logdir()
        (state,) = hub.runs.values()
        banner = " ".join(str(child.children if hasattr(child, "children") else child)
                          for child in banner_children(state.summary()))
        assert "telemetry stopped (internal error): RuntimeError: injected fault" in banner
    finally:
        hub.stop()
