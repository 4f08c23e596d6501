"""``RunRecorder``: writes every published message into a run directory from a background thread. No torch.

The publishing thread only calls ``submit`` (a non-blocking append to an inbox bounded in messages and in bytes:
once ``max_inbox_bytes`` of buffers wait, a message keeps its body but leaves its buffers behind, so a writer that
falls behind holds at most that plus one message). A daemon thread wakes every ``flush_interval`` seconds (0.5 s by
default; sooner when 32 MB are waiting, or on ``flush``/``close``) and hands the messages to a ``RunWriter``
(run_writer.py), which turns them into rows and appends them as Arrow IPC record batches to segment files — waking
once per interval rather than once per message keeps its share of the GIL, which the training thread competes for,
small; in a long backlog it writes out every 32 MB of per-filter data rather than holding it all. The run directory
stays within its disk budget (budget.py). Errors never reach the caller: the first one is stored in ``error``,
warned about once, and the recorder stops writing (everything submitted afterwards counts as a drop). Layout and
policy: docs/design.md, "Recording".
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from pathlib import Path

from ..heap import release_freed_memory
from ..wire.ledger import CpuLedger, thread_cpu
from ..wire.protocol import Message
from .budget import DEFAULT_BUDGET, DEFAULT_MIN_FREE, disk_options
from .format import LEVEL_FACTOR
from .retention import SnapshotKeep
from .run_writer import RunWriter
from .stream import warm_up

log = logging.getLogger(__name__)

_STOP = object()
_FLUSH = object()
_EARLY_FLUSH_BYTES = 32 << 20   # wake the writer before its interval once this much waits in the inbox
DEFAULT_INBOX_BYTES = 64 << 20
_TRIM_BYTES = 16 << 20          # after a message this large is written, freed memory goes back to the system


class RunRecorder:
    """Records every message submitted to it into ``run_dir`` (created), from its own background thread.

    ``float16_filters`` stores per-filter series as float16 (the reader returns float32). ``full_records``: how many
    of the most recent per-filter records each layer keeps at full resolution; ``keep_buckets``: how many of the
    most recent buckets each coarser level keeps; the coarsest level (buckets of ``10**(levels-1)`` records) keeps
    everything. ``flush_interval``: seconds between appends to disk (bounds what a SIGKILL can lose).

    ``disk_budget`` (bytes, or a string such as ``"1GB"``; None: no budget) and ``disk_min_free`` (free space never
    to go below on the filesystem) bound the run directory; ``snapshot_keep`` is the snapshot retention policy, and
    ``snapshot_dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"``) how snapshots store weights, gradients and
    activation maps (budget.py, retention.py, snapshots.py). ``max_inbox_bytes``: buffers waiting for the writer
    past which a message's buffers are dropped (its body is still recorded).
    """

    def __init__(self, run_dir, float16_filters: bool = False, queue_size: int = 10000, *,
                 full_records: int = 2000, keep_buckets: int = 1000, levels: int = 5,
                 flush_interval: float = 0.5, status_every: float = 5.0,
                 disk_budget: int | float | str | None = DEFAULT_BUDGET,
                 disk_min_free: int | float | str | None = DEFAULT_MIN_FREE, snapshot_keep: SnapshotKeep = None,
                 snapshot_dtype: str = "float32", max_inbox_bytes: int = DEFAULT_INBOX_BYTES) -> None:
        disk = disk_options(disk_budget, disk_min_free, snapshot_keep, snapshot_dtype)
        self.run_dir = Path(run_dir)
        self.float16_filters = float16_filters
        self.flush_interval = flush_interval
        self.status_every = status_every
        self.levels = max(1, int(levels))
        self.keep = tuple([max(LEVEL_FACTOR * 2, int(full_records))]
                          + [max(LEVEL_FACTOR * 2, int(keep_buckets))] * (self.levels - 1))
        self.drops = 0
        self.error: str | None = None
        self.queue_size = queue_size
        self.max_inbox_bytes = max_inbox_bytes
        self._inbox: collections.deque = collections.deque()
        self._inbox_bytes = 0          # buffers submitted and not yet handled by the writer
        self._wake = threading.Event()
        self._lock = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._closed = False
        self._dead = False
        self._warned = False
        self._bad_message_warned = False
        self._writer: RunWriter | None = None     # used by the writer thread only
        self._disk_status: dict | None = None     # replaced whole by the writer thread, read by any
        try:
            self._writer = RunWriter(self.run_dir, float16_filters, self.levels, self.keep, status_every, disk)
            self._disk_status = self._writer.keeper.status()
        except Exception as error:  # noqa: BLE001 - never raise into training
            self._fail(error)
        warm_up()
        self.ledger = CpuLedger()   # the writer thread's CPU by message type (for the callback's overhead budget)
        self._written: dict[str, int] = {}   # bytes of each message type handled since the last write to disk
        self._thread = threading.Thread(target=self._run, name="revacnn-recorder", daemon=True)
        self._thread.start()

    # -- training side ----------------------------------------------------------------------------------------
    def submit(self, message: Message) -> bool:
        """Queue ``message`` for writing; never blocks. False (and ``drops`` + 1) when full, closed or failed. Once
        ``max_inbox_bytes`` of buffers wait (so at most that plus one message's are ever held), a message is
        queued without its buffers, and counted in ``drops`` too."""
        if self._dead or self._closed:
            self._count_drop()
            return False
        size = sum(getattr(array, "nbytes", 0) for array in message.arrays.values())
        with self._lock:
            if len(self._inbox) >= self.queue_size:
                self.drops += 1
                return False
            stripped = size > 0 and self._inbox_bytes >= self.max_inbox_bytes
            if stripped:              # the buffers are not kept: the body alone waits
                self.drops += 1
                size = 0
                message = Message(message.type, message.body, {}, run=message.run, seq=message.seq,
                                  time=message.time)
            self._inbox.append((message, size, stripped))
            self._submitted += 1
            self._inbox_bytes += size
            urgent = self._inbox_bytes > _EARLY_FLUSH_BYTES
        if urgent:
            self._wake.set()
        return True

    def _count_drop(self) -> None:
        with self._lock:
            self.drops += 1

    @property
    def disk_status(self) -> dict | None:
        """How full the disk budget is and how much was dropped (the status heartbeat's ``disk``), as of the last
        write (None if the run directory could not be made)."""
        return self._disk_status

    @property
    def queue_length(self) -> int:
        """Messages waiting for the writer thread (reported in status ``queue.recording``)."""
        return len(self._inbox)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far is on disk (or dropped after an error). False on timeout."""
        with self._lock:
            target = self._submitted
            if not self._thread.is_alive():
                return self._done >= target
            self._inbox.append(_FLUSH)
        self._wake.set()
        with self._lock:
            return self._lock.wait_for(lambda: self._done >= target or not self._thread.is_alive(), timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush and close every file; idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._inbox.append(_STOP)
        self._wake.set()
        self._thread.join(timeout)

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writer thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        processed = 0
        next_flush = time.monotonic() + self.flush_interval
        stop = False
        while not stop:
            self._wake.wait(max(0.0, next_flush - time.monotonic()))
            self._wake.clear()
            with self._lock:
                items, self._inbox = self._inbox, collections.deque()
            flush = False
            while items:                 # popped one by one: a handled message's buffers are freed at once
                item = items.popleft()
                if item is _STOP:
                    stop = True
                elif item is _FLUSH:
                    flush = True
                else:
                    message, size, stripped = item
                    del item
                    start = thread_cpu()
                    self._handle_safely(message, stripped)
                    kind = message.type
                    del message
                    if size >= _TRIM_BYTES:
                        release_freed_memory()
                    self.ledger.charge(kind, thread_cpu() - start)
                    self._written[kind] = self._written.get(kind, 0) + size + 1
                    processed += 1
                    with self._lock:
                        self._inbox_bytes -= size
                    if self._writer is not None and self._writer.pending_bytes > _EARLY_FLUSH_BYTES:
                        self._write_out(False)      # a long backlog is written as it goes, not held whole
            pending = self._writer.pending_bytes if self._writer is not None else 0
            if stop or flush or time.monotonic() >= next_flush or pending > _EARLY_FLUSH_BYTES:
                self._write_out(stop)
                next_flush = time.monotonic() + self.flush_interval
                with self._lock:
                    self._done = processed
                    self._lock.notify_all()
        with self._lock:
            self._done = processed
            self._lock.notify_all()

    def _write_out(self, finish: bool) -> None:
        if self._dead:
            return
        start = thread_cpu()
        try:
            self._writer.write_out()
            if finish:
                self._writer.finish()
            self._disk_status = self._writer.keeper.status()
        except Exception as error:  # noqa: BLE001
            self._fail(error)
        # the rows and series written now came from the messages handled since the last write: shared by bytes
        self.ledger.charge_shares(self._written, thread_cpu() - start)
        self._written = {}

    def _handle_safely(self, message: Message, stripped: bool) -> None:
        if self._dead:
            self._count_drop()
            return
        try:
            self._writer.handle(message, stripped)
        except OSError as error:             # the disk: stop recording
            self._fail(error)
            self._count_drop()
        except Exception as error:  # noqa: BLE001 - one malformed message: skip it, keep recording
            self._count_drop()
            if not self._bad_message_warned:
                self._bad_message_warned = True
                log.warning("revacnn recording: skipped a %s message that could not be recorded (%s: %s)",
                            getattr(message, "type", "?"), type(error).__name__, error)

    def _fail(self, error: BaseException) -> None:
        self._dead = True
        self.error = f"{type(error).__name__}: {error}"
        if self._writer is not None:
            self._writer.abandon()
        if not self._warned:
            self._warned = True
            text = f"revacnn: run recording into {self.run_dir} stopped: {self.error}"
            log.warning(text)
            warnings.warn(text, RuntimeWarning, stacklevel=2)

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            if not self._closed and self._thread.is_alive():
                self.close(timeout=5)
        except Exception:  # noqa: BLE001
            pass
