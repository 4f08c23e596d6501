"""Shared fixtures, and the test tiers.

Every test gets one tier marker, so ``pytest -m unit`` (seconds) or ``pytest -m "not browser and not ddp"`` (the
development loop) selects a tier without moving files (docs/testing.md):

- ``browser`` and ``ddp``: set by the module's ``pytestmark`` (headless Chromium; a 2-process DDP job);
- ``integration``: the test, a fixture it uses or a helper it calls builds a real Trainer, opens sockets or starts
  a process (found in their source, see ``INTEGRATION_SIGNS``);
- ``unit``: everything else (plain objects, in-memory messages, the steering engine on a bare optimizer).

Also: a listener that collects a run's messages on a real RunClient in a background thread.
"""

from __future__ import annotations

import inspect
import re
import threading
import time
from functools import lru_cache
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


# What in a test's source (or its fixtures' and helpers') makes it an integration test: a real Trainer or its fit,
# LightningCLI, sockets (the wire, the dashboard's server), or a child process.
INTEGRATION_SIGNS = re.compile(
    r"Trainer\(|\.fit\(|LightningCLI|RunClient|Publisher\(|listener_for|Listener\(|subprocess|Popen|zmq|socket"
    r"|urlopen|free_port|Hub\(|serve\(")
TIER_MARKERS = ("browser", "ddp")


@lru_cache(maxsize=None)
def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _reaches_integration(function, module, seen: set) -> bool:
    """Whether ``function``'s source, or that of a function or class of its module it names, shows an integration sign
    (followed through the module's own names, each once)."""
    if function in seen:
        return False
    seen.add(function)
    source = _source(function)
    if INTEGRATION_SIGNS.search(source):
        return True
    for name in set(re.findall(r"\b([A-Za-z_]\w*)\b", source)):
        helper = getattr(module, name, None)
        if (inspect.isfunction(helper) or inspect.isclass(helper)) and getattr(helper, "__module__", None) in (
                module.__name__, "steering_util", "helpers"):
            if _reaches_integration(helper, module, seen):
                return True
    return False


def _is_integration(item) -> bool:
    module = item.module
    seen: set = set()
    if _reaches_integration(item.function, module, seen):
        return True
    fixtures = getattr(item, "_fixtureinfo", None)
    for name in (fixtures.names_closure if fixtures else ()):
        for definition in fixtures.name2fixturedefs.get(name, ()):
            if _reaches_integration(definition.func, module, seen):
                return True
    return False


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in TIER_MARKERS):
            continue
        item.add_marker(pytest.mark.integration if _is_integration(item) else pytest.mark.unit)
