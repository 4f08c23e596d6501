"""Shared helpers: a listener that collects a run's messages on a real RunClient in a background thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from revacnn.wire.client import RunClient


class Listener:
    """Connects to a run (once its connection file exists) and keeps every message it receives."""

    def __init__(self, target_getter, stop_states=("finished", "stopped", "failed"), timeout: float = 120.0) -> None:
        self.target_getter = target_getter
        self.stop_states = stop_states
        self.timeout = timeout
        self.messages = []
        self.welcome = None
        self.error: BaseException | None = None
        self.client: RunClient | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Listener":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            target = None
            while target is None and time.monotonic() < deadline:
                target = self.target_getter()
                if target is None:
                    time.sleep(0.02)
            self.client = RunClient(target)
            self.welcome = self.client.connect(timeout=10)
            while time.monotonic() < deadline:
                message = self.client.recv(0.2)
                if message is None:
                    continue
                self.messages.append(message)
                if message.type == "status" and message.body.get("state") in self.stop_states:
                    break
        except BaseException as error:  # reported by join()
            self.error = error
        finally:
            if self.client is not None:
                self.client.close()

    def join(self, timeout: float = 120.0) -> list:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.messages

    def of_type(self, kind: str) -> list:
        return [message for message in self.messages if message.type == kind]


@pytest.fixture
def listener_for():
    listeners = []

    def make(callback, **kwargs) -> Listener:
        listener = Listener(lambda: callback.connection_file, **kwargs).start()
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        listener._thread.join(5)


@pytest.fixture
def tmp_root(tmp_path: Path) -> Path:
    return tmp_path
