"""One I/O thread per live run: drains ``RunClient`` into a ``RunState``, sends queued commands, reconnects.

ZeroMQ sockets are not thread-safe, so this thread is the only one that touches the client: Dash callbacks put
commands into ``RunState.outbox`` and this thread sends them.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from pathlib import Path

from revacnn.wire.client import ConnectionFailed, RunClient
from revacnn.wire.connection import CONNECTION_FILE_NAME

from .history import HistoryFill
from .state import FINISHED, INCOMPATIBLE, LIVE, UNREACHABLE, RunState

#: Silence after which a run counts as unreachable (the trainer sends a heartbeat every second).
SILENCE_S = 5.0
#: How often a worker following a log folder looks for a newer run there (a restarted trainer).
FOLLOW_EVERY_S = 0.5


def resolve_target(target: str) -> str:
    """A connection file, a run directory, a log directory (the newest ``connection.json`` below it wins, so a
    restarted trainer writing ``version_1`` is found again), or ``tcp://host:port`` (returned as is)."""
    if target.startswith("tcp://"):
        return target
    path = Path(target)
    if path.is_file():
        return str(path)
    if (path / CONNECTION_FILE_NAME).is_file():
        return str(path / CONNECTION_FILE_NAME)
    if path.is_dir():
        found = glob.glob(str(path / "**" / CONNECTION_FILE_NAME), recursive=True)
        if found:
            return max(found, key=os.path.getmtime)
    return str(path)


class RunWorker(threading.Thread):
    def __init__(self, state: RunState, silence_s: float = SILENCE_S, connect_timeout: float = 3.0,
                 retry_s: float = 1.0, client_options: dict | None = None, logdir: str | None = None) -> None:
        super().__init__(name=f"revacnn-io-{state.key}", daemon=True)
        self.state = state
        self.silence_s = silence_s
        self.connect_timeout = connect_timeout
        self.retry_s = retry_s
        self.stopping = threading.Event()
        self.client: RunClient | None = None
        self.connections = 0
        self.client_options = dict(client_options or {})   # RunClient's client_keys / server_key / host
        self.history = HistoryFill(state, logdir)
        self.connected_to: str | None = None     # the connection file (or address) of the run connected to

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self.join(timeout)

    def run(self) -> None:
        while not self.stopping.is_set():
            client = self._connect()
            if client is None:
                self.stopping.wait(self.retry_s)
                continue
            try:
                self._drain(client)
            finally:
                client.close()
                self.client = None

    def _connect(self) -> RunClient | None:
        target = resolve_target(self.state.target)
        try:
            client = RunClient(target, client_name="revacnn-dash", **self.client_options)
        except ValueError as error:     # e.g. a CURVE run and no client key: RunClient's own words
            text = str(error)
            if "key" not in text.lower() and "curve" not in text.lower():
                text = f"cannot read the connection file {target}: {text}"
            self._fail_pending()
            self._unreachable(text)
            return None
        except (OSError, KeyError) as error:
            self._fail_pending()
            self._unreachable(f"cannot read the connection file {target}: {error}")
            return None
        try:
            welcome = client.connect(timeout=self.connect_timeout)
        except ConnectionFailed as error:
            client.close()
            text = str(error)
            self._fail_pending()
            if "version" in text:
                self.state.set_connection(INCOMPATIBLE, f"{text} — this dashboard speaks protocol 1; install the "
                                                        "matching revacnn version on both sides")
            else:
                self._unreachable(text)
            return None
        self.client = client
        self.connections += 1
        self.connected_to = target
        self.state.connected(welcome)
        self.history.connected(target, self.state.run_id)
        return client

    def _unreachable(self, text: str) -> None:
        if self.state.conn == FINISHED:
            self.state.set_connection(FINISHED, self.state.conn_message.split(" — ")[0]
                                      + " — the trainer has exited; waiting for a restart")
        else:
            self.state.set_connection(UNREACHABLE, f"{text}; retrying every {self.retry_s:g} s")

    def _fail_pending(self) -> None:
        for event in self.state.take_outbox():
            self.state.mark_unsent(event.id, "not sent: the run is unreachable")

    def newer_run(self) -> str | None:
        """A newer run's connection file where the target is a folder (a log folder, where a restarted trainer
        writes its next ``version_N``), else None."""
        target = self.state.target
        if target.startswith("tcp://") or not Path(target).is_dir() or (Path(target) / CONNECTION_FILE_NAME).is_file():
            return None
        newest = resolve_target(target)
        if newest == self.connected_to or not Path(newest).is_file():
            return None
        try:
            return newest if os.path.getmtime(newest) > os.path.getmtime(self.connected_to or "") else None
        except OSError:        # either file vanished between the two looks: look again next turn
            return None

    def _drain(self, client: RunClient) -> None:
        state = self.state
        connected_at = time.monotonic()
        asked_state = False
        next_follow = connected_at + FOLLOW_EVERY_S
        while not self.stopping.is_set():
            if time.monotonic() >= next_follow:
                next_follow = time.monotonic() + FOLLOW_EVERY_S
                newer = self.newer_run()
                if newer is not None:
                    state.set_connection(UNREACHABLE, f"a newer run in {state.target}: switching to {newer}…")
                    return
            self.history.poll()
            if not asked_state and state.structure is None and time.monotonic() - connected_at > 2.0:
                # A structure published while we were joining can miss both the state snapshot and the
                # subscription (PUB/SUB's slow joiner): ask for the state once more.
                asked_state = True
                try:
                    client.request_state()
                except Exception:  # zmq.Again: the run went away; the silence check handles it
                    pass
            for event in state.take_outbox():
                try:
                    client.send_command(event.op, event.args, command_id=event.id)
                except ConnectionFailed as error:
                    state.mark_unsent(event.id, str(error))
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                message = client.recv(timeout=0.05)
                if message is None:
                    break
                state.apply(message)
            state.gaps = client.gaps
            silent = time.monotonic() - client.last_heard
            if silent > self.silence_s:
                if state.conn == FINISHED:
                    self._unreachable("")
                else:
                    state.set_connection(UNREACHABLE, f"no heartbeat from run {state.run_id} for {silent:.0f} s; "
                                                      "reconnecting (re-reading the connection file)…")
                return
            if state.conn not in (LIVE, FINISHED):
                state.set_connection(LIVE, f"connected to run {state.run_id}")
