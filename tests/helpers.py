"""Helpers shared by test modules (not a test module): waiting on a condition, a quiet Trainer, and finding the
processes a command started."""

from __future__ import annotations

import time
from pathlib import Path

# What the tests' Trainers leave out unless a test asks for it: they write nothing but the callback's own run
# directory, and print nothing.
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def quiet_trainer(**arguments):
    """A ``pl.Trainer`` with ``arguments``, and without logger, checkpoints, progress bar or model summary unless
    ``arguments`` set them."""
    import pytorch_lightning as pl  # here: the dashboard's tests import this module and never need Lightning

    return pl.Trainer(**{**QUIET, **arguments})


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05):
    """``condition()``'s first true value, polled every ``interval`` s; its last (false) value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_for_message(client, predicate, timeout: float = 5.0):
    """The next message ``client`` receives that ``predicate`` accepts, skipping others; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = client.recv(0.1)
        if message is not None and predicate(message):
            return message
    raise AssertionError("condition not met")


def processes_mentioning(text: str) -> list[int]:
    """The pids of running processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found
