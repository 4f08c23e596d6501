"""Training steps/s with a hostile client flooding the control socket ÷ without it, measured side by side (issue 30).

The ReVACNN demo CNN (16-20-20, 3×32×32 digits, batch 32) trains in one fit with ``ReVACNNCallback()`` at its
defaults, on all the time. Its steps are cut into windows of ``--window`` steps, as in ``benchmarks/overhead.py``
(whose ``AlternatingWindows`` does the timing): a warm-up window, then windows alternating idle and flood, starting
and ending idle. In a flood window a client in ANOTHER process floods the trainer's control socket; in an idle window
the same client stays connected and sends nothing. The flood windows take the floods in turn (in reverse order
every other round, so that each has different neighbours):

- ``state``: valid ``state`` requests whose body carries a ``--state-elements``-element list (1M by default: the
  largest that fits the socket's 1 MiB message limit), which the trainer must decode before it can answer;
- ``commands``: commands with unique ids, half of them valid and cheap (``set_hparams`` with ``lr`` unchanged), half
  refused (an unknown op, a negative lr, a string lr, an unknown layer); each is acked twice (queued, then done or
  error) and the final ack is also published on telemetry;
- ``malformed``: frames that break the protocol in every way the server checks (not MessagePack, one frame, a
  ``type`` that is a list or a map, a string ``v``, a body that is not a map, a buffer table that lies, a disallowed
  dtype, a body nested 40 deep, a reply type sent as a request, a command id that is a list).

A flood is as fast as the trainer takes it: the client sends a batch (``--batch``: 2 state requests, 50 otherwise)
followed by a ping (a ``hello`` offering only protocol version 999, which the trainer answers with one small
``unsupported_version`` error that echoes its ``req``) and sends the next batch when at most one earlier ping is
unanswered — so the trainer always has the next batch waiting, while the backlog in the sockets stays at most two
batches deep. A ping unanswered for 2 s (or three times the slowest recent round trip) is given up on and the next
batch sent, so a trainer that drops requests does not stall the flood. When a flood stops, the client pings once
more; the idle window's timed steps start only once that ping came back and every command has its final ack (the
trainer applies queued commands between its steps: up to 1,000 can be waiting), so a flood's backlog never counts
in an idle window; the steps until then are untimed, and counted.

Each flood window's steps/s is divided by the mean of the two idle windows either side of it, so the shared
machine's drift cancels within seconds; reported per flood: the median of those paired ratios (target ≥ 0.9) with a
bootstrap 95 % interval, the mean ± 1.96 standard errors, the median steps/s, the slowest single step, the trainer's
I/O thread's CPU per step, how long the backlog took to drain once the flood stopped, the messages the client sent
and the replies it got, and the client's own CPU (on a machine with few cores it competes with the trainer for
them). The run then checks that training kept going: the fit
reached its last step, its state is ``finished``, every parameter is finite and the learning rate is unchanged. The
trainer's ``revacnn`` log goes to a file whose records are counted (issue 30 wants at most a rate-limited line per
malformed input).

    python benchmarks/hostile_client.py                  # CPU, 2,000 steps: the figure in benchmarks/RESULTS.md
    python benchmarks/hostile_client.py --append         # … and append it to benchmarks/RESULTS.md
    python benchmarks/hostile_client.py --rounds 8       # more flood windows of each kind, tighter intervals
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
import uuid

import msgpack
import zmq

#: How long a ping may stay unanswered before the client gives up on it and sends the next batch anyway, at least;
#: three times the slowest of the last 8 answered pings when that is longer (a trainer that takes seconds per
#: request is not dropping pings, only slow, and the backlog must stay bounded).
PING_TIMEOUT_S = 2.0
#: A flood's batch is sent while at most this many earlier pings are unanswered (the backlog's depth, in batches).
PINGS_IN_FLIGHT = 1
FLOODS = ("state", "commands", "malformed")
#: Messages that may wait in the trainer's own queues when an idle window starts to be timed: its recorder takes its
#: inbox every 0.5 s and the I/O thread its outbox every 50 ms, so a few dozen always wait; after a command flood,
#: thousands of final acks do.
TRAINER_BACKLOG = 100
DEFAULT_BATCH = {"state": 2, "commands": 50, "malformed": 50}


# -- the hostile client (its own process; imports neither torch nor revacnn, so it starts in a blink) ------------

def _header(kind: str, body, **fields) -> bytes:
    """A MessagePack request header as docs/protocol.md §2 lays it out (no signature: the run has no key)."""
    return msgpack.packb({"v": 1, "type": kind, "run": "", "seq": 0, "time": time.time(), "body": body,
                          "buffers": [], **fields}, use_bin_type=True)


def state_request(elements: int) -> list[bytes]:
    """A valid ``state`` request carrying an ``elements``-element list in its body (the same frames every time)."""
    return [_header("state", {"req": "big-state", "pad": [0] * elements}), b""]


def command_request(serial: int, prefix: str, lr: float) -> list[bytes]:
    """Command ``serial`` of the flood, with a unique id: even serials are valid and change nothing (``set_hparams``
    with ``lr`` unchanged), odd ones are refused by the trainer for one of four reasons."""
    refused = ({"op": "no_such_op", "args": {}}, {"op": "set_hparams", "args": {"lr": -1.0}},
               {"op": "set_hparams", "args": {"lr": "fast"}}, {"op": "freeze", "args": {"layers": ["net.nowhere"]}})
    command = {"op": "set_hparams", "args": {"lr": lr}} if serial % 2 == 0 else refused[(serial // 2) % 4]
    return [_header("command", {"req": f"c{serial}", "id": f"{prefix}-{serial}", **command}), b""]


def malformed_requests() -> list[list[bytes]]:
    """One message per way of breaking the protocol that the server checks; the flood sends them in turn."""
    nested: object = 0
    for _ in range(40):
        nested = [nested]
    return [
        [b"\xc1 not msgpack", b""],                                       # 0xc1 is never valid MessagePack
        [b"only one frame"],
        [_header(["state"], {"req": "t-list"}), b""],                     # a type that is a list …
        [_header({"state": 1}, {"req": "t-map"}), b""],                   # … or a map
        [msgpack.packb({"v": "1", "type": "state", "body": {}}), b""],   # a version that is a string
        [_header("state", ["not", "a", "map"]), b""],
        [_header("state", {"req": "lying-table"}, buffers=[{"name": "a", "dtype": "<f4", "shape": [4]}]), b""],
        [_header("state", {"req": "bad-dtype"}, buffers=[{"name": "a", "dtype": "O", "shape": [1]}]), b"", b"\0"],
        [_header("state", {"req": "deep", "x": nested}), b""],
        [_header("welcome", {"req": "reply-as-request"}), b""],
        [_header("command", {"req": "id-list", "id": ["x"], "op": "pause", "args": {}}), b""],
        [msgpack.packb(msgpack.ExtType(1, b"ext")), b""],
    ]


def ping(req: str) -> list[bytes]:
    """A request the trainer answers with one small reply echoing ``req``: a ``hello`` offering only version 999."""
    return [_header("hello", {"req": req, "versions": [999], "client": "hostile"}), b""]


class Flood:
    """The client's bookkeeping: the messages of each flood, what was sent, what came back, and the pings.

    ``next_batch(kind)`` gives a batch of messages of a flood followed by a ping, or nothing while more than
    ``PINGS_IN_FLIGHT`` pings are unanswered; ``received(header)`` books a reply. Pure bookkeeping, no sockets.
    """

    def __init__(self, state_elements: int, lr: float, batch: dict[str, int]) -> None:
        self.prefix = uuid.uuid4().hex[:12]
        self.lr = lr
        self.batch = batch
        self.state = state_request(state_elements)
        self.malformed = malformed_requests()
        self.serial = 0
        self.pings: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.ping_serial = 0
        self.sent: collections.Counter = collections.Counter()
        self.replies: collections.Counter = collections.Counter()
        self.pings_lost = 0
        self.round_trips: collections.deque[float] = collections.deque(maxlen=8)
        self.finals = 0                 # final acks (done or error) of the commands sent
        self.last_final = 0.0           # when the latest came
        self.awaiting: set[str] = set()  # ids of commands acked ``queued`` whose final ack has not come

    def message(self, kind: str) -> list[bytes]:
        self.serial += 1
        if kind == "state":
            return self.state
        if kind == "commands":
            return command_request(self.serial, self.prefix, self.lr)
        return self.malformed[self.serial % len(self.malformed)]

    def new_ping(self, now: float) -> tuple[str, list[bytes]]:
        """A ping's req and frames, booked as unanswered since ``now``."""
        self.ping_serial += 1
        req = f"ping-{self.ping_serial}"
        self.pings[req] = now
        return req, ping(req)

    def next_batch(self, kind: str, now: float) -> list[list[bytes]]:
        """A batch of ``kind`` and a ping, when the backlog allows one; ``[]`` otherwise."""
        self.expire(now)
        if len(self.pings) > PINGS_IN_FLIGHT:
            return []
        messages = [self.message(kind) for _ in range(self.batch[kind])]
        self.sent[kind] += len(messages)
        return [*messages, self.new_ping(now)[1]]

    def ping_timeout(self) -> float:
        return max([PING_TIMEOUT_S, *(3 * seconds for seconds in self.round_trips)])

    def expire(self, now: float) -> None:
        """Give up on pings unanswered for ``ping_timeout()``: the flood must not stall on a dropped one."""
        timeout = self.ping_timeout()
        for req, sent in list(self.pings.items()):
            if now - sent > timeout:
                del self.pings[req]
                self.pings_lost += 1

    def received(self, header: object, now: float) -> str | None:
        """Book a reply's header that arrived at ``now``; returns the req of the ping it answers, if it answers one."""
        if not isinstance(header, dict):
            self.replies["undecodable"] += 1
            return None
        body = header.get("body") if isinstance(header.get("body"), dict) else {}
        req = body.get("req")
        if isinstance(req, str) and req in self.pings:
            sent = self.pings.pop(req)
            if now >= sent:                                   # not one of the pings that never time out
                self.round_trips.append(now - sent)
            return req
        kind = header.get("type")
        if kind == "ack":
            self.replies[f"ack {body.get('status')}"] += 1
            if body.get("status") == "queued":
                self.awaiting.add(body.get("id"))
            else:
                self.finals, self.last_final = self.finals + 1, now
                self.awaiting.discard(body.get("id"))
        elif kind == "error":
            self.replies[f"error {body.get('error')}"] += 1
        else:
            self.replies["state message" if kind != "welcome" else "welcome"] += 1
        return None

    def outstanding(self) -> int:
        """Commands the trainer queued whose final ack has not come (it applies them between its steps). A command
        never acked ``queued`` was refused at once or dropped unread by the per-client rate limit: nothing waits."""
        return len(self.awaiting)

    def drained(self, ping_answered_at: float, now: float) -> bool:
        """Whether what was sent before going idle is handled: the drain ping came back (answered at
        ``ping_answered_at``, None while not) and every command has its final ack — or none came for
        ``PING_TIMEOUT_S`` since (a trainer that never answers some commands must not stall the benchmark)."""
        if ping_answered_at is None:
            return False
        return self.outstanding() <= 0 or now - max(ping_answered_at, self.last_final) > PING_TIMEOUT_S

    def totals(self) -> dict:
        return {"sent": dict(self.sent), "replies": dict(self.replies), "pings_lost": self.pings_lost,
                "unanswered_commands": self.outstanding()}


def client_main(endpoint: str, steer: str, state_elements: int, lr: float, batch: dict[str, int]) -> None:
    """The hostile client: floods ``endpoint`` (the trainer's control socket) as the parent says on ``steer``.

    The parent sends ``["mode", kind]`` (a flood, or ``"idle"``) and ``["quit"]`` on a PAIR socket; the client
    answers ``{"ready": …}`` once its first ping came back, ``{"drained": seconds, "after": kind}`` when what it sent
    before going idle is handled (``Flood.drained``: the ping it sent on going idle came back, and every command has
    its final ack), and its totals on quitting.
    """
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)          # read every reply: an unread reply must not stall the trainer's sends
    dealer.connect(endpoint)
    control = context.socket(zmq.PAIR)
    control.setsockopt(zmq.LINGER, 1000)
    control.connect(steer)
    flood = Flood(state_elements, lr, batch)
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    mode, drain_ping, drain_from, drain_after, drain_answered, drain_sent = "idle", None, 0.0, "idle", None, 0.0
    ready_ping = "ping-ready"
    flood.pings[ready_ping] = time.monotonic() + 3600    # the trainer may still be starting: no timeout for this one
    dealer.send_multipart(ping(ready_ping))
    cpu_at = time.process_time()
    parent = os.getppid()
    while True:
        events = dict(poller.poll(0 if mode != "idle" else 50))
        now = time.monotonic()
        if os.getppid() != parent:                            # the benchmark died: never flood on alone
            break
        while dealer in events and dealer.poll(0):
            frames = dealer.recv_multipart()
            try:
                header = msgpack.unpackb(frames[0], raw=False)
            except Exception:
                header = None
            answered = flood.received(header, now)
            if answered == ready_ping:
                control.send_json({"ready": True})
            elif answered is not None and answered == drain_ping:
                drain_answered = now
        if drain_ping is not None and flood.drained(drain_answered, now):
            control.send_json({"drained": now - drain_from, "after": drain_after})
            drain_ping = drain_answered = None
        elif drain_ping is not None and drain_answered is None and now - drain_sent > PING_TIMEOUT_S:
            # the trainer's per-client rate limit drops requests unread once a flood has spent the client's
            # tokens: ask again (a fresh ping, once tokens are back) rather than wait for an answer that never comes
            flood.pings.pop(drain_ping, None)
            drain_ping, packet = flood.new_ping(now)
            flood.pings[drain_ping], drain_sent = now + 3600, now
            dealer.send_multipart(packet)
        if control in events:
            order = control.recv_json()
            if order[0] == "quit":
                control.send_json({**flood.totals(), "cpu_s": time.process_time() - cpu_at})
                break
            if order[1] == "idle" and mode != "idle":       # what was sent is handled when this ping comes back
                drain_from, drain_after = now, mode
                drain_ping, packet = flood.new_ping(now)
                flood.pings[drain_ping], drain_sent = now + 3600, now  # not expired: sent again (above) instead
                dealer.send_multipart(packet)
            mode = order[1]
        if mode != "idle":
            for message in flood.next_batch(mode, now):
                dealer.send_multipart(message)
            if len(flood.pings) > PINGS_IN_FLIGHT:
                poller.poll(5)                                # wait for a reply rather than spin
    dealer.close()
    control.close()
    context.term()


if __name__ == "__main__" and sys.argv[1:2] == ["--client"]:
    # The client process stops here, before torch is imported: it stays small and starts at once.
    _endpoint, _steer, _elements, _lr, _batch = sys.argv[2:7]
    client_main(_endpoint, _steer, int(_elements), float(_lr), json.loads(_batch))
    sys.exit(0)


# -- the trainer's side ----------------------------------------------------------------------------------------

import logging  # noqa: E402  (below the client on purpose: see above)
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/overhead.py: the windows, the model, the trainer, the interval)

from revacnn import ReVACNNCallback  # noqa: E402
from revacnn.demo import DigitsDataModule  # noqa: E402


class IdleClient:
    """What ``FloodWindows`` steers before the hostile client is up: nothing to switch, nothing to wait for."""

    def switch(self, mode: str) -> None:
        pass

    def drained(self) -> bool:
        return True


class FloodWindows(overhead.AlternatingWindows):
    """``AlternatingWindows`` whose "on" is a flood on the control socket instead of a callback's hooks.

    The callbacks it gates are none (``ReVACNNCallback`` runs in every window, outside it). At the start of every
    window it calls ``client.switch(kind)``: the next of ``floods`` in turn for an on window, ``"idle"`` for an off
    one (``flood_of``). An idle window's timed steps begin at its ``settle``-th step or, when ``client.drained()``
    is still false then, at the first step after it turned true: a flood's backlog (requests in the sockets,
    commands queued for the training thread) never counts in an idle window; nor do the messages that the flood left
    in the trainer's own queues beyond the usual (``trainer_backlog()`` above ``TRAINER_BACKLOG``: the I/O thread's
    outbox, the recorder's inbox — final acks are recorded too). ``client.drained()`` must not block: the training
    thread asks, and it is the one that applies queued commands. ``kinds`` holds each window's flood (None for idle
    ones), ``slowest`` each window's slowest timed step in seconds, ``io_cpu`` the CPU seconds of the trainer's I/O
    thread in each window's timed steps, ``waited`` the steps each window left untimed beyond ``settle``, for the
    backlog.
    """

    def __init__(self, floods: list[str], window: int, settle: int, client=None) -> None:
        super().__init__([], window, settle)
        self.floods, self.client = list(floods), client or IdleClient()
        self.kinds: list[str | None] = []
        self.slowest: list[float] = []
        self.io_cpu: list[float] = []
        self.waited: list[int] = []
        self._io_at: float | None = None
        self.trainer_backlog = lambda: 0   # messages the trainer's I/O thread and recorder have yet to handle
        self._timed_from = 0            # the first timed step of the current window
        self._waiting = False           # an idle window whose backlog is not handled yet

    def flood_of(self, on_window: int) -> str:
        """The flood of the ``on_window``-th flood window: ``floods`` in turn, in reverse order every other round,
        so that no flood always has the same floods (and their after-effects) either side of it."""
        count = len(self.floods)
        round_, place = divmod(on_window, count)
        return self.floods[place if round_ % 2 == 0 else count - 1 - place]

    def _close_step(self, now: float, step: int) -> None:
        if step - 1 < self._timed_from:
            return
        if self._last is not None and (step - 1) % self.window >= self.settle:
            self.slowest[-1] = max(self.slowest[-1], now - self._last)
        super()._close_step(now, step)

    def _io_thread(self) -> float:
        return sum(seconds for name, seconds in overhead.Breakdown.thread_cpu().items()
                   if name.startswith("revacnn-io"))

    def _close_io(self) -> None:
        if self._io_at is not None:
            self.io_cpu[-1] += self._io_thread() - self._io_at
            self._io_at = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        position = step % self.window
        if position == 0:
            self._close_io()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if position == 0:
            if len(self.windows) > 1:
                done, steps, seconds = self.kinds[-1], self.windows[-2][1], self.windows[-2][2]
                print(f"window {len(self.windows) - 2} ({done or 'idle'}): {steps / max(seconds, 1e-9):.1f} steps/s",
                      file=sys.stderr, flush=True)
            kind = self.flood_of(step // self.window // 2 - 1) if self.on else None
            self.kinds.append(kind)
            self.slowest.append(0.0)
            self.io_cpu.append(0.0)
            self.waited.append(0)
            self.client.switch(kind or "idle")
            self._timed_from, self._waiting = step + self.settle, kind is None
        if position >= self.settle and self._waiting:
            if self.client.drained() and self.trainer_backlog() <= TRAINER_BACKLOG:
                self._waiting, self._timed_from = False, step
                self._io_at = self._io_thread()
                self._last = time.perf_counter()    # this step is the first timed one
            else:
                self._timed_from = step + 1
                self.waited[-1] += 1
        elif position == self.settle:
            self._io_at = self._io_thread()

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        self._close_io()
        self.client.switch("idle")

    def paired(self, kind: str) -> overhead.PairedWindows:
        """The windows of flood ``kind``, each with the idle windows either side of it, as ``PairedWindows``."""
        paired = overhead.PairedWindows()
        paired.windows.append([False, 0, 0.0])                    # the warm-up's place, never used
        for index, this in enumerate(self.kinds):
            # an idle neighbour that never got to its timed steps (the backlog took the whole window) pairs nothing
            if (this == kind and 0 < index < len(self.windows) - 1
                    and self.windows[index - 1][1] and self.windows[index + 1][1]):
                paired.windows += [self.windows[index - 1], self.windows[index], self.windows[index + 1]]
        return paired

    def slowest_step(self, kind: str | None) -> float:
        """The slowest timed step of the windows of ``kind`` (None: the idle windows after the warm-up), seconds."""
        return max((slow for index, (this, slow) in enumerate(zip(self.kinds, self.slowest))
                    if this == kind and index > 0), default=float("nan"))

    def io_ms_per_step(self, kind: str | None) -> float:
        """The I/O thread's CPU per timed step in the windows of ``kind`` (None: idle), milliseconds."""
        chosen = [index for index, this in enumerate(self.kinds) if this == kind and index > 0]
        steps = sum(self.windows[index][1] for index in chosen)
        return 1000.0 * sum(self.io_cpu[index] for index in chosen) / max(1, steps)


class HostileClient:
    """The client process and the PAIR socket that steers it, from the training thread (never blocks there)."""

    def __init__(self, endpoint: str, args) -> None:
        self.context = zmq.Context()
        self.steer = self.context.socket(zmq.PAIR)
        self.steer.setsockopt(zmq.LINGER, 0)
        port = self.steer.bind_to_random_port("tcp://127.0.0.1")
        batch = dict(DEFAULT_BATCH, state=args.state_batch, commands=args.batch, malformed=args.batch)
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--client", endpoint,
                                         f"tcp://127.0.0.1:{port}", str(args.state_elements), str(args.lr),
                                         json.dumps(batch)])
        self.drains: list[tuple[str, float]] = []
        self.totals: dict = {}
        self.mode, self.draining = "idle", False
        self._wait(lambda reply: "ready" in reply, 60.0, "the hostile client did not connect")

    def _wait(self, accept, timeout: float, failure: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.steer.poll(100):
                reply = self.steer.recv_json()
                self._note(reply)
                if accept(reply):
                    return reply
        raise RuntimeError(failure)

    def _note(self, reply: dict) -> None:
        if "drained" in reply:
            self.drains.append((reply["after"], reply["drained"]))
            self.draining = False

    def switch(self, mode: str) -> None:
        """Tell the client to flood (``mode`` a flood) or to stop (``"idle"``); returns at once."""
        while self.steer.poll(0):
            self._note(self.steer.recv_json())
        if mode == "idle" and self.mode != "idle":
            self.draining = True
        self.mode = mode
        self.steer.send_json(["mode", mode], zmq.NOBLOCK)

    def drained(self) -> bool:
        """Whether everything the client sent before it went idle has been handled (never waits: the training
        thread asks, and it is the one that applies queued commands)."""
        while self.draining and self.steer.poll(0):
            self._note(self.steer.recv_json())
        return not self.draining

    def close(self) -> None:
        try:
            self.steer.send_json(["quit"], zmq.NOBLOCK)
            self.totals = self._wait(lambda reply: "sent" in reply, 60.0, "the hostile client did not report")
        finally:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.steer.close()
            self.context.term()


class ClientLauncher(overhead.pl.Callback):
    """Starts the hostile client once the callback's sockets are bound (the start of training), before timing."""

    def __init__(self, revacnn: ReVACNNCallback, windows: FloodWindows, args) -> None:
        self.revacnn, self.windows, self.args = revacnn, windows, args
        self.client: HostileClient | None = None
        self.publisher = None   # kept: the callback forgets its publisher when the fit ends

    def on_train_start(self, trainer, pl_module):
        self.publisher = self.revacnn.publisher
        self.client = HostileClient(self.publisher.control_endpoint, self.args)
        self.windows.client = self.client
        recorder = self.revacnn.recorder
        self.windows.trainer_backlog = lambda: (self.publisher.queue_length
                                                + (recorder.queue_length if recorder is not None else 0))


class CountingHandler(logging.FileHandler):
    """Writes the trainer's ``revacnn`` log to a file (formatted as usual, tracebacks included) and counts it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.records: collections.Counter = collections.Counter()

    def emit(self, record):
        self.records[record.levelname] += 1
        super().emit(record)


def run(args, root: str) -> dict:
    """One fit with the flood windows; returns everything the report needs."""
    data = DigitsDataModule(batch_size=32)
    data.setup()
    model_args = SimpleNamespace(device="cpu", model="revacnn", widths=(32, 64, 128))
    module = overhead._model(model_args)
    args.lr = module.lr
    floods = [kind for kind in FLOODS if kind in args.floods]
    windows = FloodWindows(floods, args.window, args.settle)
    revacnn = ReVACNNCallback()
    launcher = ClientLauncher(revacnn, windows, args)
    max_steps = args.window * (2 * args.rounds * len(floods) + 2)
    log_path = Path(root) / "revacnn.log"
    handler = CountingHandler(log_path)
    logger = logging.getLogger("revacnn")
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    started = time.perf_counter()
    trainer = overhead._trainer(model_args, root, max_steps, [windows, revacnn, launcher])
    try:
        trainer.fit(module, data)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()
        if launcher.client is not None:
            launcher.client.close()
    optimizer = trainer.optimizers[0]
    return {
        "windows": windows, "floods": floods, "seconds": time.perf_counter() - started,
        "steps": trainer.global_step, "max_steps": max_steps,
        "finite": all(bool(torch.isfinite(parameter).all()) for parameter in module.parameters()),
        "lr": [group["lr"] for group in optimizer.param_groups], "lr_expected": args.lr,
        "status": dict(launcher.publisher._status) if launcher.publisher is not None else {},
        "internal_errors": launcher.publisher.internal_errors if launcher.publisher is not None else 0,
        "log": dict(handler.records), "log_bytes": log_path.stat().st_size if log_path.exists() else 0,
        "client": launcher.client.totals if launcher.client else {},
        "drains": launcher.client.drains if launcher.client else [],
    }


def report(result: dict, args, command: str) -> list[str]:
    """The markdown lines of one run: a table per flood, then whether training kept going."""
    windows: FloodWindows = result["windows"]
    lines = ["| flood | ratio: median of flood ÷ neighbouring idle windows | 95 % CI of the median | mean ± 95 % | "
             "steps/s idle / flood (medians) | flood windows | slowest step idle / flood, ms | I/O thread CPU idle / "
             "flood, ms/step | backlog drained after the flood stopped, s (longest) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    settle_s = args.settle / max(1e-9, windows.rate(False))
    for kind in result["floods"]:
        paired = windows.paired(kind)
        ratios = paired.ratios()
        low, high = overhead.median_interval(ratios) if ratios else (math.nan, math.nan)
        half = 1.96 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else math.nan
        drains = [seconds for after, seconds in result["drains"] if after == kind]
        label = {"state": f"state requests with a {args.state_elements:,}-element list",
                 "commands": "commands, unique ids (half set_hparams lr unchanged, half refused)",
                 "malformed": "malformed frames (12 kinds in turn)"}[kind]
        lines.append(
            f"| {label} | {statistics.median(ratios):.3f} | {low:.3f}–{high:.3f} | "
            f"{statistics.mean(ratios):.3f} ± {half:.3f} | {paired.rate(False):.1f} / {paired.rate(True):.1f} | "
            f"{len(ratios)} | {1000 * windows.slowest_step(None):.0f} / {1000 * windows.slowest_step(kind):.0f} | "
            f"{windows.io_ms_per_step(None):.2f} / {windows.io_ms_per_step(kind):.2f} | "
            f"{max(drains) if drains else math.nan:.2f} |")
    client = result["client"]
    sent = ", ".join(f"{kind} {count:,}" for kind, count in client.get("sent", {}).items())
    replies = ", ".join(f"{kind} {count:,}" for kind, count in sorted(client.get("replies", {}).items()))
    kept = (result["steps"] == result["max_steps"] and result["finite"]
            and all(lr == result["lr_expected"] for lr in result["lr"]))
    status = result["status"]
    lines += [
        "",
        f"Training kept going: **{'yes' if kept else 'NO'}** — the fit reached step {result['steps']:,} of "
        f"{result['max_steps']:,} in {result['seconds']:.0f} s; state {status.get('state')!r}; every parameter "
        f"finite: {result['finite']}; lr {result['lr']} (was {result['lr_expected']}); control requests that "
        f"failed with `internal`: {result['internal_errors']:,}.",
        f"The client sent: {sent or 'nothing'} (+ pings; {client.get('pings_lost', 0)} given up on after "
        f"{PING_TIMEOUT_S:.0f} s or 3× the slowest recent round trip); replies: {replies or 'none'}; its own CPU: "
        f"{client.get('cpu_s', math.nan):.1f} s in the whole run.",
        f"The trainer's `revacnn` log: {sum(result['log'].values()):,} records "
        f"({', '.join(f'{level} {count:,}' for level, count in sorted(result['log'].items())) or 'none'}), "
        f"{result['log_bytes']:,} bytes. Untimed at the start of each window: {args.settle} steps (≈ "
        f"{settle_s:.1f} s idle), and in idle windows any further steps until the flood's backlog was handled: "
        f"{sum(windows.waited)} steps in all.",
    ]
    return lines


def machine_line() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), pyzmq {zmq.__version__}; load average at the "
            f"end {load} (other jobs shared the machine)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3,
                        help="flood windows of each kind, each between two idle windows (default 3)")
    parser.add_argument("--window", type=int, default=100, help="steps per window (default 100)")
    parser.add_argument("--settle", type=int, default=20,
                        help="untimed steps at the start of each window (default 20): the flood starts, or the "
                             "backlog of a stopped one drains, there")
    parser.add_argument("--floods", default=",".join(FLOODS),
                        help=f"which floods, comma-separated, in turn (default {','.join(FLOODS)})")
    parser.add_argument("--state-elements", type=int, default=1_000_000,
                        help="elements of the list in each state request's body (default 1,000,000: ~1 MB, just "
                             "under the control socket's 1 MiB limit)")
    parser.add_argument("--state-batch", type=int, default=DEFAULT_BATCH["state"],
                        help=f"state requests per ping (default {DEFAULT_BATCH['state']})")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH["commands"],
                        help=f"commands or malformed messages per ping (default {DEFAULT_BATCH['commands']})")
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.floods = [kind.strip() for kind in args.floods.split(",") if kind.strip()]
    unknown = sorted(set(args.floods) - set(FLOODS))
    if unknown or not args.floods:
        parser.error(f"--floods takes some of {', '.join(FLOODS)}, got {unknown or 'none'}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not 0 <= args.settle < args.window:
        parser.error(f"--settle must be in [0, --window), got {args.settle} with window {args.window}")
    if args.state_elements < 0 or args.state_batch < 1 or args.batch < 1:
        parser.error("--state-elements must be ≥ 0, --state-batch and --batch ≥ 1")
    command = "python benchmarks/hostile_client.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nrevacnn demo CNN on cpu ({torch.get_num_threads()} threads), batch 32 of 32×32, ReVACNNCallback() at "
          f"its defaults; windows of {args.window} steps ({args.settle} untimed), {args.rounds} flood windows of each "
          f"kind\n", flush=True)
    with tempfile.TemporaryDirectory() as root:
        result = run(args, root)
    lines = report(result, args, command)
    machine = machine_line()
    print("\n".join(lines))
    print(f"\nMachine: {machine}")
    if args.append:
        results = Path(__file__).with_name("RESULTS.md")
        block = (f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — hostile client\n\n"
                 f"Command: `{command.strip()}`  \nMachine: {machine}\n\n" + "\n".join(lines) + "\n")
        results.write_text(results.read_text().rstrip("\n") + "\n" + block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
