"""What the browser and process tests share: Debian's Chromium for Playwright, its flags, a free port, and Ctrl-C as a
terminal delivers it.

Playwright never downloads a browser here; Debian's ``chromium`` package is used (``.ci/setup`` installs it). On CI
(``CI`` set) a missing Chromium fails the browser tests instead of skipping them, so a broken set-up cannot pass.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def require_chromium() -> None:
    """Skip (or, on CI, fail) the calling test module when Debian's Chromium is not installed."""
    if os.path.exists(CHROMIUM):
        return
    message = "Debian's chromium is not installed (apt-get install -y chromium; .ci/setup does it)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT, as Ctrl-C would: its SIGINT back at the default.

    A test run started in the background (``nohup pytest … &``) has SIGINT ignored, as a non-interactive shell does
    for its background jobs, and a child inherits that: it would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def served_dashboard(logdir: Path, *arguments: str) -> Iterator[tuple[int, TextIO]]:
    """A real ``revacnn-dash`` process on 127.0.0.1 reading ``logdir``, with ``arguments`` added (no token in the
    environment): yields its port and its output log (opened for reading) once it answers HTTP; stopped after."""
    import requests

    from helpers import wait_for

    port = free_port()
    log = open(logdir / "dash.log", "w+")
    env = {**os.environ, "REVACNN_DASH_TOKEN": ""}
    proc = subprocess.Popen([sys.executable, "-m", "revacnn_dash.cli", "--logdir", str(logdir), "--host", "127.0.0.1",
                             "--port", str(port), "--no-umap-warmup", "--threads", "2", *arguments],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1], env=env)

    def serving() -> bool:
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            return True
        except requests.ConnectionError:
            assert proc.poll() is None, (logdir / "dash.log").read_text()
            return False

    try:
        wait_for(serving, timeout=60, interval=0.2)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
