"""The README's first command, `.venv/bin/revacnn demo`, run as a newcomer runs it: the venv not activated (its bin
directory not on PATH), a real trainer and a real dashboard as its children, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from browser_support import free_port, sigint_as_in_a_terminal
from helpers import processes_mentioning, wait_for

ROOT = Path(__file__).resolve().parents[1]


def demo_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("revacnn")       # the console script next to the venv's python
    base = [str(script)] if script.exists() else [sys.executable, "-m", "revacnn.cli"]
    return base + ["demo", *args]


def start_demo(tmp_path: Path, port: int, *args: str, preexec=sigint_as_in_a_terminal
               ) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "demo.log"
    env = {**os.environ, "PATH": "/usr/bin:/bin"}            # no venv on PATH: only this interpreter finds revacnn
    process = subprocess.Popen(demo_command("--root", str(tmp_path / "run"), "--port", str(port), *args),
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                               start_new_session=True,   # its own group: a failed test kills what it left (below)
                               preexec_fn=preexec)
    return process, log


def sigint_ignored() -> None:
    """``preexec_fn``: SIGINT ignored, as a non-interactive shell starts its background jobs (``revacnn demo &``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass


def wait_or_show_log(condition, timeout: float, what: str, log: Path):
    """``condition()``'s first true value; fails with ``what`` and the end of the demo's log after ``timeout`` s."""
    value = wait_for(condition, timeout, interval=0.3)
    if value:
        return value
    raise AssertionError(f"{what} within {timeout} s; the demo printed:\n{log.read_text()[-3000:]}")


def page_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return response.status if b"revacnn" in response.read().lower() else None
    except OSError:
        return None


def test_demo_trains_serves_the_page_and_stops_on_ctrl_c_without_the_venv_on_path(tmp_path):
    port = free_port()
    process, log = start_demo(tmp_path, port, "--epochs", "2", "--slow", "0")
    try:
        wait_or_show_log(lambda: f"dashboard: http://127.0.0.1:{port}/" in log.read_text(), 120,
                 "the demo printed no dashboard URL", log)
        assert page_status(port) == 200                      # the URL works the moment it is printed
        wait_or_show_log(lambda: "training finished" in log.read_text(), 120, "training did not finish", log)
        run = tmp_path / "run" / "lightning_logs" / "version_0" / "revacnn"
        assert (run / "connection.json").exists()
        assert page_status(port) == 200                      # the dashboard outlives the training
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        wait_or_show_log(lambda: not processes_mentioning(str(tmp_path / "run")), 15, "a child outlived the demo", log)
        assert page_status(port) is None
    finally:
        kill_group(process)


def test_demo_reports_a_busy_port_and_stops_its_trainer(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process, log = start_demo(tmp_path, port, "--epochs", "50")
        try:
            assert process.wait(180) == 1
        finally:
            kill_group(process)
        text = log.read_text()
        assert f"revacnn-dash: cannot serve on 127.0.0.1:{port}: Address already in use" in text, text[-3000:]
        assert "revacnn demo: the dashboard exited (code 1" in text
        wait_or_show_log(lambda: not processes_mentioning(str(tmp_path / "run")), 15, "the trainer outlived the demo",
                         log)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "sigint-started-ignored"])
def test_ctrl_c_or_sigterm_stops_the_demo_and_its_children_in_order(tmp_path, stop):
    """"sigint-started-ignored": started as a shell's background job, SIGINT ignored, then `kill -INT` of the demo
    alone; its children would inherit the ignored SIGINT (and the demo's SIGINT to them would do nothing) had the
    demo not handled it."""
    port = free_port()
    process, log = start_demo(tmp_path, port, "--epochs", "50",
                              **({"preexec": sigint_ignored} if stop == "sigint-started-ignored" else {}))
    try:
        wait_or_show_log(lambda: f"dashboard: http://127.0.0.1:{port}/" in log.read_text(), 120,
                 "the demo printed no dashboard URL", log)
        assert processes_mentioning(str(tmp_path / "run"))   # the trainer and the dashboard are running
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)    # what Ctrl-C does: the terminal signals the whole foreground group
        elif stop == "sigint-started-ignored":
            process.send_signal(signal.SIGINT)       # `kill -INT`: the demo alone
        else:
            process.terminate()                      # `kill`: the demo alone
        assert process.wait(30) == 0
        wait_or_show_log(lambda: not processes_mentioning(str(tmp_path / "run")), 15, "a child outlived the demo", log)
        assert page_status(port) is None
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert "Detected KeyboardInterrupt, attempting graceful shutdown" in text   # the trainer stopped in order
        # the demo says the run was stopped, from the state it recorded: it did not finish
        assert "training finished" not in text, text[-3000:]
        assert "revacnn demo: training stopped at step " in text and "(interrupted (KeyboardInterrupt))" in text, \
            text[-3000:]
    finally:
        kill_group(process)


@pytest.mark.parametrize(("status", "code", "said"), [
    ({"state": "finished", "step": 92}, 0, "training finished at step 92"),
    ({"state": "stopped", "step": 12, "message": "interrupted (KeyboardInterrupt)"}, 0,
     "training stopped at step 12 (interrupted (KeyboardInterrupt))"),
    ({"state": "stopped", "step": 7}, 0, "training stopped at step 7"),                 # a stop from the dashboard
    ({"state": "failed", "step": 3, "message": "RuntimeError: boom"}, 1, "training failed at step 3 (RuntimeError: boom)"),
    (None, 0, "training finished"),                                                    # no recording: the exit code
    (None, -2, "training stopped (the trainer exited with code -2)"),
])
def test_the_demo_says_how_the_run_ended_not_always_finished(monkeypatch, tmp_path, status, code, said):
    """A run stopped with Ctrl-C (or from the dashboard, or failed) was reported as "training finished"."""
    import revacnn.recording.reader as reader
    from revacnn.cli import _run_end

    class Run:
        def status(self):
            if status is None:
                raise FileNotFoundError("no run.json")
            return status

    monkeypatch.setattr(reader, "open_run", lambda path: Run())
    assert _run_end(tmp_path / "connection.json", code) == said
