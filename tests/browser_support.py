"""What the browser and process tests share: Debian's Chromium for Playwright, its flags, a free port, and Ctrl-C as a
terminal delivers it.

Playwright never downloads a browser here; Debian's ``chromium`` package is used (``.ci/setup`` installs it). On CI
(``CI`` set) a missing Chromium fails the browser tests instead of skipping them, so a broken set-up cannot pass.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket

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
