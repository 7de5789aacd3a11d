"""The event log of the prediction service: a bounded buffer drained by a background thread.

Requests never wait for Kafka. A handler appends one :class:`~serving.events.PredictionBatch`
per call to the buffer (a deque append) and returns; the ``event-log`` thread encodes one
``prediction`` event per entity (:class:`~serving.events.PredictionEncoder`) and hands them to
the :class:`~streams.producer.EventProducer`. Nothing blocks, and every loss is counted in
``headwater_serving_events_dropped_total`` while requests keep being answered:
``buffer_full`` when this buffer is full (the thread cannot keep up), ``broker`` when
librdkafka's own bounded queue is full (the broker is down) or it gave up delivering a
record (``message.timeout.ms``), ``encode`` if a batch could not be encoded.

Alerts (a model that failed to load) go through the same thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any

from headwater.settings import Settings
from serving.events import PredictionBatch, PredictionEncoder
from serving.metrics import ServingMetrics
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog

__all__ = ["EventLog"]

log = logging.getLogger(__name__)

# Calls drained per turn: on the event loop a turn must stay short (requests wait behind it).
_LOOP_BUDGET = 64
_THREAD_BUDGET = 1024
_PREDICTION_HEADERS: list[tuple[str, str | bytes | None]] = [("event_type", b"prediction")]


class EventLog:
    """Bounded, non-blocking logging of prediction events and alerts."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        metrics: ServingMetrics,
        *,
        capacity: int,
        producer_config: dict[str, Any] | None = None,
        drain_interval_s: float = 0.005,
    ) -> None:
        self.capacity = capacity
        self.metrics = metrics
        self._serde = serde
        self._settings = settings
        self._producer_config = {
            # librdkafka's own queue is bounded too, so a dead broker fills ours and we count drops.
            "queue.buffering.max.messages": max(1000, capacity),
            "message.timeout.ms": 30_000,
            "linger.ms": 20,  # larger batches: less of librdkafka's CPU per event; nobody waits on them
            # Reports for failed deliveries only: one Python callback per event sent costs ~1 us
            # of the event loop's time for nothing (only failures are counted).
            "delivery.report.only.error": True,
            **(producer_config or {}),
        }
        self._topic = TopicCatalog(settings).name("predictions")
        self._queue: deque[tuple[PredictionEncoder, PredictionBatch] | dict[str, Any]] = deque()
        # Submitted (under _submit_lock) minus drained (event-log thread only): the backlog.
        self._submit_lock = threading.Lock()
        self._submitted = 0
        self._drained = 0
        self.dropped = 0  # buffer full
        self._dropped_counter = metrics.events_dropped.labels("buffer_full")
        self.failed = 0  # event-log thread (encode errors, deliveries that failed)
        self.sent = 0
        self.drain_interval_s = drain_interval_s
        self._failed_seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None
        self._producer: EventProducer | None = None

    @property
    def backlog(self) -> int:
        return self._submitted - self._drained

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> EventLog:
        """Drain on ``loop`` (a callback every few ms, between requests), else on a thread of its own."""
        if self._producer is None:
            self._producer = EventProducer(
                self._settings, self._serde, client_id="serving", config=self._producer_config
            )
            if loop is not None:
                self._loop = loop
                self._timer = loop.call_soon_threadsafe(self._tick)
            else:
                self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
                self._thread.start()
        return self

    def submit(self, encoder: PredictionEncoder, batch: PredictionBatch) -> bool:
        """Queue the events of one call; False (and counted) when the buffer is full."""
        n = len(batch.entity_keys)
        with self._submit_lock:  # the request thread and the shadow thread both submit
            if self._submitted - self._drained + n > self.capacity:
                self.dropped += n
                self._dropped_counter.inc(n)
                return False
            self._submitted += n
        self._queue.append((encoder, batch))
        return True

    def alert(self, record: dict[str, Any]) -> None:
        """Queue an ``alert`` event (never dropped: alerts are rare and matter)."""
        self._queue.append(record)

    def _tick(self) -> None:
        """One drain on the event loop, then the next one scheduled."""
        self.drain(_LOOP_BUDGET)
        if not self._stop.is_set() and self._loop is not None:
            self._timer = self._loop.call_later(0 if self._queue else self.drain_interval_s, self._tick)

    def _run(self) -> None:
        while True:
            if not self.drain(_THREAD_BUDGET):
                if self._stop.is_set():
                    return
                self._stop.wait(self.drain_interval_s)

    def drain(self, budget: int) -> int:
        """Encode and queue up to ``budget`` calls' events in librdkafka; how many calls were handled."""
        queue, producer = self._queue, self._producer
        assert producer is not None
        done = 0
        while queue and done < budget:
            item = queue.popleft()
            done += 1
            if isinstance(item, dict):
                self._send_alert(producer, item)
                continue
            self._produce(producer, *item)
        producer.poll()
        if producer.failed != self._failed_seen:  # deliveries librdkafka gave up on
            lost = producer.failed - self._failed_seen
            self._failed_seen = producer.failed
            self.failed += lost
            self.metrics.events_dropped.labels("broker").inc(lost)
        self.metrics.event_backlog.set(self.backlog)
        return done

    def _produce(self, producer: EventProducer, encoder: PredictionEncoder, batch: PredictionBatch) -> None:
        n = len(batch.entity_keys)
        try:
            values = encoder.encode(batch)
        except Exception:  # a bug must cost events, never the service
            log.exception(
                "encoding %d prediction events of %s v%d failed", n, batch.model_name, batch.model_version
            )
            self.failed += n
            self.metrics.events_dropped.labels("encode").inc(n)
            self._drained += n
            return
        refused = producer.try_send_many(self._topic, values, batch.entity_keys, headers=_PREDICTION_HEADERS)
        self._drained += n
        self.sent += n - refused
        self.metrics.events_sent.inc(n - refused)
        if refused:
            self.failed += refused
            self.metrics.events_dropped.labels("broker").inc(refused)

    def _send_alert(self, producer: EventProducer, record: dict[str, Any]) -> None:
        try:
            producer.send("alerts", record)
        except Exception:
            log.exception("could not send alert %s", record.get("kind"))

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop draining, hand what is queued to the producer, flush it (up to 5 s).

        In loop mode, call it on the loop's thread (the server does)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            if self._producer is not None:
                while self.drain(_THREAD_BUDGET):
                    pass
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning(
                    "event log still sending after %.0fs (broker down?); %d events not sent",
                    timeout_s,
                    self.backlog,
                )
            self._thread = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None
