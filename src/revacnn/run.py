"""One run of ``ReVACNNCallback`` (one ``fit``): its id, its directory, the publisher and the recorder that live as
long as it does, and its state (starting, running, paused, validating, stopping, stopped, finished, failed)."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from revacnn.wire.acks import run_state
from revacnn.wire.connection import CONNECTION_FILE_NAME, ConnectionInfo, CurveServerKeys
from revacnn.wire.publisher import Publisher


def holds_run(directory: Path) -> bool:
    from revacnn.recording.format import MARKER  # here: pyarrow loads only where a recording is made

    return (directory / MARKER).exists() or (directory / CONNECTION_FILE_NAME).exists()


def unused_run_dir(log_dir: Path) -> Path:
    """``<log_dir>/revacnn``, or ``revacnn-2``, ``-3``, … where a run was recorded before (a Trainer without a
    logger uses the same log directory every time; each run gets its own recording)."""
    candidate, number = log_dir / "revacnn", 1
    while holds_run(candidate):
        number += 1
        candidate = log_dir / f"revacnn-{number}"
    return candidate


@dataclass(frozen=True)
class Transport:
    """How a run publishes and records (the callback's arguments of the same names)."""

    host: str
    telemetry_port: int
    control_port: int
    record: bool
    sign: bool
    send_hwm: int
    queue_size: int
    insecure_bind: bool
    curve: bool
    keys_dir: str | os.PathLike | None
    recording: dict[str, Any]    # RunRecorder's disk arguments (disk_budget, disk_min_free, snapshot_keep, …)

    def __post_init__(self) -> None:
        from revacnn.recording.budget import disk_options   # loads no pyarrow

        disk_options(**self.recording)   # ValueError when the callback is made, not at fit


class Run:
    """A run's identity and lifetime: opened on rank 0 at the fit's start, closed at its end."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.run_dir = run_dir
        self.publisher: Publisher | None = None
        self.recorder = None
        self.connection_file: Path | None = None
        self.state = "starting"
        self.stopping_for_recording = False

    def open(self, trainer: pl.Trainer, log_dir: Path | None, transport: Transport) -> Publisher:
        """Choose the run directory, start the recorder and the publisher, and write the connection file."""
        if self.run_dir is None:
            self.run_dir = unused_run_dir(log_dir)
        elif holds_run(self.run_dir):
            rank_zero_warn(f"revacnn: {self.run_dir} already holds a recorded run; this run is recorded into it too, "
                           "and from its first step on replaces what was recorded there (a run resumed from a "
                           "checkpoint goes on with its recording). Pass a fresh run_dir to keep runs apart")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sinks = []
        if transport.record:
            from revacnn.recording import RunRecorder

            self.recorder = RunRecorder(self.run_dir, **transport.recording)
            sinks.append(self.recorder)
        key = secrets.token_bytes(32) if transport.sign else None
        curve = CurveServerKeys.from_keys_dir(transport.keys_dir) if transport.curve else None
        self.publisher = Publisher(self.run_id, host=transport.host, telemetry_port=transport.telemetry_port,
                                   control_port=transport.control_port, key=key, send_hwm=transport.send_hwm,
                                   queue_size=transport.queue_size, sinks=sinks,
                                   insecure_bind=transport.insecure_bind, curve=curve).start()
        self.publisher.set_status(world_size=trainer.world_size)
        info = ConnectionInfo(self.run_id, self.publisher.telemetry_endpoint, self.publisher.control_endpoint,
                              key=key.hex() if key else "", security="curve" if curve else "none",
                              curve_server_key=curve.public.decode() if curve else "")
        self.connection_file = info.write(self.run_dir / CONNECTION_FILE_NAME)
        rank_zero_info(f"revacnn: run {self.run_id} — watch it with: revacnn-dash --connect {self.connection_file}")
        return self.publisher

    def announce_resume(self, trainer: pl.Trainer, resumed_run: str | None) -> None:
        """Say which run a fit resumed from a checkpoint continues, and from which step: in the log, and in the
        heartbeat (so the dashboard and the recording show it)."""
        resumed = {"run": resumed_run, "step": trainer.global_step, "checkpoint": str(trainer.ckpt_path)}
        earlier = f"run {resumed_run}" if resumed_run else "a checkpoint saved without this callback"
        rank_zero_info(f"revacnn: run {self.run_id} continues {earlier} from step {trainer.global_step} "
                       f"({trainer.ckpt_path})")
        if self.publisher is not None:
            self.publisher.set_status(resumed=resumed)

    def set_state(self, state: str, trainer: pl.Trainer, message: str = "") -> None:
        self.state = state
        if self.publisher is not None:
            self.publisher.set_status(**run_state(state, step=trainer.global_step, epoch=trainer.current_epoch,
                                                  message=message))

    def recording_stop(self, on_recording_error: str) -> dict[str, Any] | None:
        """The ``stop`` command the run gives itself, once, when its recording failed and it was asked to stop then
        (it rides the command broadcast, so every DDP rank stops at the same batch)."""
        if (on_recording_error != "stop" or self.stopping_for_recording or self.recorder is None
                or not self.recorder.error):
            return None
        self.stopping_for_recording = True
        rank_zero_warn(f"revacnn: the recording failed ({self.recorder.error}); stopping as asked "
                       "(on_recording_error='stop')")
        return {"req": "", "id": f"recording-error-{self.run_id}", "op": "stop", "args": {}}

    def ack(self, command: dict[str, Any], status: str, trainer: pl.Trainer, error: str | None = None,
            result: dict[str, Any] | None = None) -> None:
        if self.publisher is not None:
            self.publisher.send_ack(command, status, step=trainer.global_step, error=error, result=result)

    def close(self) -> None:
        """Send and write what is queued; idempotent."""
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        if self.recorder is not None:
            self.recorder.close()
