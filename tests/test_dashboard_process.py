"""`revacnn-dash` as a process: however it is stopped, it stops quietly and takes its t-SNE / UMAP helper processes
with it. A helper left behind holds ~0.5 GB and runs on; one interrupted by Ctrl-C printed a numba traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browser_support import free_port, sigint_as_in_a_terminal
from test_dashboard_state import wait_for


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def running(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"   # a zombie has ended
    except (OSError, IndexError):
        return False


def ignores_sigint(pid: int) -> bool:
    try:
        line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def serves(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("stop, code", [("ctrl-c", 0), ("sigterm", 0), ("sigkill", -signal.SIGKILL)])
def test_the_dashboard_stops_quietly_and_takes_its_helper_processes_with_it(tmp_path, stop, code):
    port = free_port()
    log = tmp_path / "dash.log"
    # Its own process group, as a terminal gives a command
    process = subprocess.Popen([sys.executable, "-m", "revacnn_dash.cli", "--logdir", str(tmp_path), "--port",
                                str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=sigint_as_in_a_terminal)
    try:
        assert wait_for(lambda: serves(port), 60), log.read_text()
        # The UMAP warm-up's helper starts at once and compiles numba code for ~10-25 s: stop the dashboard mid-job,
        # once the helper is on it (its initialiser has run: it ignores SIGINT). In its first ~0.5 s, while it
        # imports, a Ctrl-C can still interrupt it with a traceback; the dashboard stops it all the same.
        def helper_pids() -> list[int]:
            return [pid for pid in children(process.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]

        assert wait_for(helper_pids, 30), f"no helper process started; children: {children(process.pid)}"
        helpers = helper_pids()
        wait_for(lambda: all(ignores_sigint(pid) for pid in helpers), 5)
        everything = children(process.pid)           # the helper and multiprocessing's resource tracker
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)    # what Ctrl-C does: every process of the group gets it
        elif stop == "sigterm":
            process.terminate()
        else:
            process.kill()
        assert process.wait(20) == code
        left = wait_for(lambda: not [pid for pid in everything if running(pid)], 15)
        assert left, f"still running after the dashboard stopped: {[pid for pid in everything if running(pid)]}"
        if stop != "sigkill":
            output = log.read_text()
            assert "Traceback" not in output, output[-3000:]
            # the helpers' pool shut down cleanly: multiprocessing's resource tracker found nothing left over
            assert "leaked semaphore" not in output and "resource_tracker" not in output, output[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        for pid in everything if "everything" in locals() else children(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


SERVICE_SCRIPT = """
import sys, time
import numpy as np
from revacnn_dash.compute.embedding_service import EmbeddingService
service = EmbeddingService()
if sys.argv[1] == "umap":
    service.warm_umap()
    deadline = time.monotonic() + 240
    while service.umap_state != "ready" and time.monotonic() < deadline:
        time.sleep(0.1)
    print(service.umap_state, flush=True)
else:
    assert service._submit("tsne", sum, [1, 2]).result(60) == 3
service.shutdown()
"""


@pytest.mark.parametrize("helper", ["umap", "tsne"])
def test_idle_helper_processes_shut_down_without_leaking_semaphores(tmp_path, helper):
    """Every exit of the dashboard printed multiprocessing's "resource_tracker: There appear to be 1 leaked
    semaphore objects": the helpers, idle after the UMAP warm-up, were killed rather than stopped."""
    result = subprocess.run([sys.executable, "-c", SERVICE_SCRIPT, helper], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                str(Path(__file__).resolve().parents[1] / d) for d in ("src", "dashboard"))})
    assert result.returncode == 0, result.stderr[-3000:]
    assert helper == "tsne" or result.stdout.strip() == "ready", result.stdout + result.stderr[-3000:]
    assert "leaked" not in result.stderr and "resource_tracker" not in result.stderr, result.stderr[-3000:]


def test_the_serving_line_starts_a_line_of_its_own_in_a_terminal(tmp_path):
    """In the demo the trainer's progress bar and the dashboard share the terminal: "revacnn-dash: serving on …"
    was glued onto the end of the bar's line (it draws with carriage returns, no newline)."""
    import pty
    import select

    port = free_port()
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "revacnn_dash.cli", "--logdir", str(tmp_path), "--port",
                                str(port), "--no-umap-warmup"], stdout=follower, stderr=follower,
                               start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while b"serving on" not in output and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    output += os.read(leader, 4096)
                except OSError:
                    break
    finally:
        process.terminate()
        process.wait(20)
        os.close(leader)
    text = output.decode(errors="replace")
    assert "\nrevacnn-dash: serving on http://127.0.0.1:" in text.replace("\r\n", "\n"), text
    assert text.replace("\r\n", "\n").startswith("\nrevacnn-dash: serving on"), text
