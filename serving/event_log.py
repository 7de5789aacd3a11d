"""The event log of the prediction service: a bounded buffer, drained by a sender process.

Requests never wait for Kafka. A handler submits one :class:`~serving.events.PredictionBatch`
per call (a list append); every few milliseconds the event loop pickles what was submitted
into one frame and writes it into a pipe to the sender process (:mod:`serving.event_sender`),
which encodes one ``prediction`` event per entity and hands them to librdkafka, off this
process's GIL. Nothing blocks, and every loss is counted in
``headwater_serving_events_dropped_total`` while requests keep being answered:
``buffer_full`` when more events than ``capacity`` are waiting (the sender cannot keep up),
``broker`` when librdkafka's own bounded queue is full (the broker is down) or it gave up
delivering a record (``message.timeout.ms``), or the sender replaced a producer that could not
deliver any more (a restarted broker: the sender follows it by itself), ``encode`` if a batch
could not be encoded, ``too_large`` for an event over the producer's ``message.max.bytes``,
``sender`` for what a sender process that died had not sent (a new one is started). Losses
are logged as one line per ``summary_interval_s`` with the count per reason, never one per
event: a broker that is down for an hour costs a line every few seconds, not millions.

Alerts (a model that failed to load, a fallback to an earlier version) go the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from headwater.errors import HeadwaterError
from headwater.settings import Settings
from serving.event_sender import FRAME
from serving.events import PredictionBatch, PredictionEncoder
from serving.metrics import ServingMetrics

__all__ = ["EventLog"]

log = logging.getLogger(__name__)

_PIPE_BYTES = 1 << 20  # ~20 100-entity calls in flight to the sender
_NO_TOTALS = (0, 0, 0, 0)  # delivered, broker, encode, too_large


@dataclass(slots=True)
class _Frame:
    kind: str
    data: bytes | memoryview
    started: bool = False  # partly written


class _Sender:
    """One sender process and the pipes to it; its running totals as last reported."""

    def __init__(self, config: bytes) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.event_sender"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: the default 64 KiB
            fcntl.fcntl(self.stdin, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        os.write(self.stdin, config)  # before non-blocking: it fits in any pipe
        os.set_blocking(self.stdin, False)
        os.set_blocking(self.stdout, False)
        self.encoder_ids: weakref.WeakKeyDictionary[PredictionEncoder, int] = weakref.WeakKeyDictionary()
        self.totals = _NO_TOTALS
        self.last_error = ""  # the sender's last delivery error
        self.ready = False
        self._partial = b""

    def read_reports(self) -> bool:
        """Take the newest report; False at end of file (the process ended)."""
        data = b""
        while True:
            try:
                chunk = os.read(self.stdout, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self._take(data)
                return False
            data += chunk
        self._take(data)
        return True

    def _take(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines[-1]
        for line in reversed(lines[:-1]):
            if line:
                fields = line.split(b" ", 4)
                self.totals = tuple(int(x) for x in fields[:4])  # type: ignore[assignment]
                self.last_error = fields[4].decode(errors="replace") if len(fields) > 4 else ""
                self.ready = True
                return

    def wait_reports(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for output and take it; False at end of file."""
        select.select([self.stdout], [], [], max(0.0, timeout_s))
        return self.read_reports()

    def close_input(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()


class EventLog:
    """Bounded, non-blocking logging of prediction events and alerts."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServingMetrics,
        *,
        capacity: int,
        producer_config: dict[str, Any] | None = None,
        drain_interval_s: float = 0.005,
        flush_timeout_s: float = 5.0,
        restart_interval_s: float = 5.0,
        summary_interval_s: float = 10.0,
        nice: int = 0,
    ) -> None:
        self.capacity = capacity
        self.metrics = metrics
        self.drain_interval_s = drain_interval_s
        self.flush_timeout_s = flush_timeout_s
        producer_config = {
            # librdkafka's own queue is bounded too, so a dead broker fills ours and we count drops.
            "queue.buffering.max.messages": max(1000, capacity),
            "message.timeout.ms": 30_000,
            "linger.ms": 20,  # larger batches: less of librdkafka's CPU per event; nobody waits on them
            # Reports for failed deliveries only: one Python callback per event sent costs ~1 us
            # for nothing (only failures are counted).
            "delivery.report.only.error": True,
            **(producer_config or {}),
        }
        config = pickle.dumps(
            (
                "config",
                nice,
                settings.model_dump(mode="json"),
                producer_config,
                flush_timeout_s,
                log.getEffectiveLevel(),
            )
        )
        self._config = FRAME.pack(len(config)) + config
        self._lock = threading.Lock()  # the request path and the shadow thread both submit
        self._pending: deque[_Frame] = deque()
        self._batches: list[tuple[int, PredictionBatch]] = []  # submitted, not framed yet
        self._submitted = 0
        self._base = _NO_TOTALS  # the totals of senders that ended
        self._lost = 0  # events a sender that died had not sent
        self._counted = _NO_TOTALS  # already added to the metrics
        self.dropped = 0  # buffer full
        self._dropped_counter = metrics.events_dropped.labels("buffer_full")
        self.summary_interval_s = summary_interval_s
        self._summary_at = time.monotonic() + summary_interval_s
        self._summarised: dict[str, int] = {}  # losses by reason at the last summary line
        self.restart_interval_s = restart_interval_s
        self._sender: _Sender | None = None
        self._restart_at = 0.0  # a sender that died is replaced, at most once per interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None

    @property
    def sent(self) -> int:
        """Events the broker acknowledged."""
        return self._counted[0]

    @property
    def failed(self) -> int:
        """Events lost past the buffer: refused or not delivered, not encoded or too large, or with a
        sender that died."""
        return self._counted[1] + self._counted[2] + self._counted[3] + self._lost

    def losses(self) -> dict[str, int]:
        """Events lost so far, by reason (the labels of ``events_dropped``)."""
        _, broker, encode, too_large = self._counted
        return {
            "buffer_full": self.dropped,
            "broker": broker,
            "encode": encode,
            "too_large": too_large,
            "sender": self._lost,
        }

    @property
    def backlog(self) -> int:
        """Events submitted and neither delivered nor counted as lost."""
        return self._submitted - self.sent - self.failed

    def start(self, loop: asyncio.AbstractEventLoop | None = None, timeout_s: float = 60.0) -> EventLog:
        """Start the sender (wait until it runs); pump on ``loop`` every few ms, else on a thread."""
        if self._sender is None:
            self._spawn()
            sender = self._sender
            assert sender is not None
            deadline = time.monotonic() + timeout_s
            while not sender.ready:
                if not sender.wait_reports(deadline - time.monotonic()) or time.monotonic() > deadline:
                    sender.proc.kill()
                    raise HeadwaterError(
                        f"the event log's sender process did not start (exit {sender.proc.wait()}; "
                        "its log is above)"
                    )
            if loop is not None:
                self._loop = loop
                self._timer = loop.call_soon_threadsafe(self._tick)
            else:
                self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
                self._thread.start()
        return self

    def _spawn(self) -> None:
        self._sender = _Sender(self._config)
        self._restart_at = time.monotonic() + self.restart_interval_s

    def submit(self, encoder: PredictionEncoder, batch: PredictionBatch) -> bool:
        """Queue the events of one call; False (and counted) when the buffer is full."""
        n = len(batch.entity_keys)
        with self._lock:
            if self._sender is None:  # it died, and its replacement is not due yet
                self._submitted += n
                self._lost += n
                self.metrics.events_dropped.labels("sender").inc(n)
                return False
            if self.backlog + n > self.capacity:
                self.dropped += n
                self._dropped_counter.inc(n)
                return False
            ids = self._sender.encoder_ids
            eid = ids.get(encoder)
            if eid is None:
                eid = ids[encoder] = len(ids) + 1
                self._frame("encoder", eid, encoder.header, encoder.columns, encoder.feature_sets)
            self._batches.append((eid, batch))  # pickled with the others at the next pump
            self._submitted += n
        return True

    def alert(self, record: dict[str, Any]) -> None:
        """Queue an ``alert`` event: never dropped here (alerts are rare and matter); one still in a
        producer the sender replaces is lost, and logged as an error."""
        with self._lock:
            self._frame("alert", record)

    def _frame_batches(self) -> None:
        """The calls submitted since the last pump, as one frame: one pickle and one message for
        the sender per few milliseconds, not per call."""
        if self._batches:
            self._frame("batches", self._batches)
            self._batches = []

    def _frame(self, kind: str, *fields: Any) -> None:
        body = pickle.dumps((kind, *fields), protocol=pickle.HIGHEST_PROTOCOL)
        self._pending.append(_Frame(kind, FRAME.pack(len(body)) + body))

    def _tick(self) -> None:
        """One pump on the event loop, then the next one scheduled."""
        self.pump()
        if not self._stop.is_set() and self._loop is not None:
            self._timer = self._loop.call_later(self.drain_interval_s, self._tick)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pump()
            self._stop.wait(self.drain_interval_s)

    def pump(self) -> None:
        """Write what is queued into the pipe (as much as fits), then take the sender's report."""
        sender = self._sender
        if sender is None:
            if not self._stop.is_set() and time.monotonic() >= self._restart_at:
                with self._lock:
                    self._spawn()
            return
        with self._lock:
            self._frame_batches()
            alive = self._write(sender) and sender.read_reports()
            if not alive:
                alive = sender.proc.poll() is None
            self._account(sender)
            if not alive and not self._stop.is_set():
                self._restart(sender)
        self.metrics.event_backlog.set(self.backlog)
        if time.monotonic() >= self._summary_at:
            self._summarise()

    def _summarise(self) -> None:
        """One log line for every event lost since the last one, by reason; none if nothing was."""
        self._summary_at = time.monotonic() + self.summary_interval_s
        losses = self.losses()
        new = {reason: n - self._summarised.get(reason, 0) for reason, n in losses.items()}
        self._summarised = losses
        if any(new.values()):
            sender = self._sender
            last = sender.last_error if sender is not None else ""
            log.warning(
                "event log: %d prediction events lost in the last %.0fs (%s)%s; backlog %d",
                sum(new.values()),
                self.summary_interval_s,
                ", ".join(f"{reason} {n}" for reason, n in new.items() if n),
                f"; last delivery error: {last}" if last else "",
                self.backlog,
            )

    def _write(self, sender: _Sender) -> bool:
        pending = self._pending
        while pending:
            head = pending[0]
            try:
                written = os.write(sender.stdin, head.data)
            except BlockingIOError:
                return True
            except OSError:  # BrokenPipeError: the process ended
                return False
            if written == len(head.data):
                pending.popleft()
            else:
                head.data = memoryview(head.data)[written:]
                head.started = True
        return True

    def _account(self, sender: _Sender) -> None:
        """Counts and metrics from the sender's running totals."""
        totals = tuple(b + t for b, t in zip(self._base, sender.totals, strict=True))
        if totals != self._counted:
            sent, *lost = totals
            done_sent, *done_lost = self._counted
            if sent > done_sent:
                self.metrics.events_sent.inc(sent - done_sent)
            for reason, n, done in zip(("broker", "encode", "too_large"), lost, done_lost, strict=True):
                if n > done:
                    self.metrics.events_dropped.labels(reason).inc(n - done)
            self._counted = totals  # type: ignore[assignment]

    def _restart(self, sender: _Sender) -> None:
        """The sender died: what it had not delivered is lost (counted); a new one takes over."""
        code = sender.proc.wait()
        self._account(sender)
        self._base = self._counted
        lost = self.backlog  # in its pipe, its memory or librdkafka's queue, or still queued here
        log.error("the event log's sender process ended (exit %s): %d events lost", code, lost)
        self._lost += lost
        self.metrics.events_dropped.labels("sender").inc(lost)
        # Batches and encoders were for the old process (their loss is counted above); a frame
        # half written to it cannot be finished. Alerts go to the next one.
        self._pending = deque(f for f in self._pending if f.kind == "alert" and not f.started)
        self._batches = []
        self._sender = None
        if time.monotonic() >= self._restart_at:
            self._spawn()
        else:  # it died soon after its start: a new one in a while, not in a loop
            log.error(
                "a new sender in %.1fs; events are dropped until then", self._restart_at - time.monotonic()
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop pumping, hand what is queued to the sender, let it flush (up to ``timeout_s``).

        In loop mode, call it on the loop's thread (the server does)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        sender = self._sender
        if sender is None:
            return
        end = time.monotonic() + timeout_s + self.flush_timeout_s
        os.set_blocking(sender.stdin, True)
        with self._lock:
            self._frame_batches()
            self._write(sender)
        sender.close_input()
        while sender.wait_reports(end - time.monotonic()) and time.monotonic() < end:
            pass
        try:
            sender.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            sender.proc.kill()
            sender.proc.wait()
        with self._lock:
            self._account(sender)
        if self.backlog:
            log.warning("event log closed with %d events not sent (broker down?)", self.backlog)
        self._sender = None
