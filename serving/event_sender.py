"""The event log's sender process: encodes prediction events and hands them to Kafka.

Why a process: encoding one ``prediction`` event per entity and one ``produce`` call each cost
~0.6 ms of a 100-entity call, on the thread that also runs gRPC's event loop; with the GIL,
every microsecond of it is a microsecond requests cannot use (measured: calls/s fall by a
third, and a thread of its own is worse, from GIL contention). The parent
(:class:`serving.event_log.EventLog`) pickles the :class:`~serving.events.PredictionBatch` of
the calls of the last few milliseconds (numpy matrices and a few lists) into a pipe as one
frame, and this process does the rest on a core of its own.

Protocol, parent to child on stdin: frames of a 4-byte little-endian length and a pickle:
``("config", nice, settings, producer_config, flush_timeout_s, log_level)`` first, then
``("encoder", id, header, columns, feature_sets)`` once per model version, ``("batches",
[(id, batch), ...])`` with the calls of the last few milliseconds, and ``("alert", record)``.
Child to parent on stdout: one line per report, ``delivered broker encode too_large`` as
running totals (prediction events the broker acknowledged; refused by librdkafka or not
delivered; not encoded; larger than the producer's ``message.max.bytes``), then the last
delivery error, if any. The parent counts everything else it submitted as not yet settled,
and as lost if this process dies. End of stdin: flush (up to ``flush_timeout_s``), report, exit.
Alerts have a producer of their own (made at the first one), so the counts are of predictions
only. Pickle is safe here: both ends are this program, over an anonymous pipe.

Nothing a batch holds ends this process: an event it cannot encode or that is too large is
counted, and a producer that cannot go on is replaced (what it held is counted as lost):
after a fatal error, when a new embedded broker runs in the data directory
(:class:`serving.broker_watch.BrokerWatch`: ``headwater up`` started it again, at the same or
a new address), or when nothing was delivered for ``_STALL_S`` while the broker answers (a
broker that lost its state refuses the idempotent producer's id, and librdkafka retries that
forever). Losses are not logged one by one: the parent logs one summary per interval.

Run as ``python -m serving.event_sender`` by the parent only.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from headwater.errors import HeadwaterError
from headwater.settings import Settings
from serving.broker_watch import BrokerWatch
from serving.events import PredictionBatch, PredictionEncoder
from streams.catalog import SchemaCatalog
from streams.kafka import client_config
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog

__all__ = ["FRAME", "main"]

log = logging.getLogger("serving.event_sender" if __name__ == "__main__" else __name__)  # run with -m

FRAME = struct.Struct("<I")
_REPORT_INTERVAL_S = 0.05
_STALL_S = 5.0  # records waiting, none delivered for this long, the broker answering: a new producer
_RECORD_OVERHEAD = 512  # bytes a record adds to its key and value in a produce request (headers, framing)
_PREDICTION_HEADERS: list[tuple[str, str | bytes | None]] = [("event_type", b"prediction")]


class _Sender:
    def __init__(self, settings: Settings, producer_config: dict[str, Any], out: BinaryIO) -> None:
        self.serde = Serde(SchemaCatalog.load(settings.schemas_dir))
        self.settings = settings
        self.producer_config = {**producer_config, "error_cb": self._on_error}
        self.max_bytes = int(producer_config.get("message.max.bytes", 1_000_000)) - _RECORD_OVERHEAD
        self.watch = BrokerWatch(settings)
        self.producer = self._producer()
        self.topic = TopicCatalog(settings).name("predictions")
        self.alerts: EventProducer | None = None
        self.encoders: dict[int, PredictionEncoder] = {}
        self.out = out
        # Totals over every producer this process made: the current one's are added on report.
        self.accepted = self.refused = self.unencoded = self.too_large = 0
        self._delivered_before = 0  # by producers replaced since
        self._fatal: str | None = None
        self._last_error = ""
        self._progress: tuple[int, int] = (0, 0)
        self._progress_at = time.monotonic()
        self._reported: tuple[Any, ...] = ()
        self._last_report = 0.0

    def _producer(self) -> EventProducer:
        return EventProducer(
            self.settings, self.serde, client_id="serving", config=self.producer_config, log_failures=False
        )

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's client-level errors (served by poll): a fatal one means a new producer."""
        if error.fatal():
            self._fatal = str(error)

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "batches":
            encoders = self.encoders
            for eid, batch in message[1]:
                encoder = encoders.get(eid)
                if encoder is None:  # cannot happen: the parent sends a version's encoder first
                    log.error("no encoder %d: %d events not sent", eid, len(batch.entity_keys))
                    self.unencoded += len(batch.entity_keys)
                else:
                    self._batch(encoder, batch)
        elif kind == "encoder":
            self.encoders[message[1]] = PredictionEncoder(*message[2:])
        elif kind == "alert":
            try:
                if self.alerts is None:
                    self.alerts = EventProducer(
                        self.settings,
                        self.serde,
                        client_id="serving-alerts",
                        config={"error_cb": self._on_error},
                    )
                self.alerts.send("alerts", message[1])
            except Exception:
                log.exception("could not send alert %s", message[1].get("kind"))

    def _batch(self, encoder: PredictionEncoder, batch: PredictionBatch) -> None:
        n = len(batch.entity_keys)
        try:
            values = encoder.encode(batch)
        except Exception:  # a bug must cost events, never the service
            log.exception(
                "encoding %d prediction events of %s v%d failed", n, batch.model_name, batch.model_version
            )
            self.unencoded += n
            return
        keys = batch.entity_keys
        # A record is its key and its value, which holds the key too: at most twice the value.
        if 2 * max(map(len, values)) > self.max_bytes:
            fits = [len(v) + len(k.encode()) <= self.max_bytes for v, k in zip(values, keys, strict=True)]
            values = [v for v, ok in zip(values, fits, strict=True) if ok]
            keys = [k for k, ok in zip(keys, fits, strict=True) if ok]
            self.too_large += n - len(values)
            n = len(values)
        producer = self.producer
        queued = producer.in_flight()
        try:
            refused = producer.try_send_many(self.topic, values, keys, headers=_PREDICTION_HEADERS)
        except KafkaException as exc:  # fatal: this producer takes nothing more
            self._fatal = str(exc.args[0])
            refused = n - (producer.in_flight() - queued)
        self.accepted += n - refused
        self.refused += refused

    def maintain(self) -> None:
        """A new producer when this one cannot deliver any more (see the module's docstring)."""
        producer = self.producer
        if self._fatal is not None:
            self._replace(f"fatal error: {self._fatal}")
        elif self.watch.changed():
            info = self.watch.current
            self._replace(f"a new embedded broker runs at {info.bootstrap if info else '?'}")
        else:
            progress = (self._delivered(), producer.failed)
            now = time.monotonic()
            if progress != self._progress or not producer.in_flight():
                self._progress, self._progress_at = progress, now
            elif now - self._progress_at > _STALL_S:
                self._progress_at = now
                if self._reachable():
                    self._replace(f"nothing delivered for {_STALL_S:.0f}s while the broker answers")

    def _reachable(self) -> bool:
        try:
            config = client_config(self.settings, **{"socket.connection.setup.timeout.ms": 1000})
            AdminClient(config).list_topics(timeout=1.0)
        except (KafkaException, HeadwaterError):
            return False
        return True

    def _replace(self, why: str) -> None:
        try:
            new = self._producer()
        except HeadwaterError as exc:  # no broker in the data directory right now: next time
            log.warning("event log: cannot make a new producer (%s): %s", why, exc)
            return
        old = self.producer
        lost = old.purge() + old.in_flight()  # purged records are counted in old.failed
        self._delivered_before = self._delivered()
        self.refused += old.failed + old.in_flight()
        self.accepted = 0
        self.producer = new
        if self.alerts is not None:
            lost_alerts = self.alerts.purge()
            self.alerts = None  # made again at the next alert
            if lost_alerts:
                log.error("event log: %d alerts not delivered before the producer was replaced", lost_alerts)
        self._fatal = None
        self._progress, self._progress_at = (self._delivered(), 0), time.monotonic()
        log.warning("event log: new producer (%s); %d prediction events it held are lost", why, lost)

    def _delivered(self) -> int:
        producer = self.producer
        return self._delivered_before + self.accepted - producer.in_flight() - producer.failed

    def report(self, force: bool = False) -> None:
        producer = self.producer
        producer.poll()
        if self.alerts is not None:
            self.alerts.poll()
        now = time.monotonic()
        if not force and now - self._last_report < _REPORT_INTERVAL_S:
            return
        self.maintain()
        producer = self.producer
        if producer.last_error is not None:
            self._last_error = str(producer.last_error).replace("\n", " ")[:200]
        totals = (self._delivered(), self.refused + producer.failed, self.unencoded, self.too_large)
        if force or totals != self._reported:
            self.out.write(("{} {} {} {} {}\n".format(*totals, self._last_error)).encode())
            self.out.flush()
            self._reported = totals
        self._last_report = now


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _frames(fd: int, sender: _Sender) -> Iterator[tuple[Any, ...]]:
    """Messages from the pipe until it closes; reports between them, and while it is idle."""
    buffer = bytearray()
    while True:
        if len(buffer) < FRAME.size:
            ready, _, _ = select.select([fd], [], [], _REPORT_INTERVAL_S)
            if not ready:
                sender.report()
                continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return
        buffer += chunk
        view = memoryview(buffer)
        at = 0
        while len(view) - at >= FRAME.size:
            (size,) = FRAME.unpack_from(view, at)
            if len(view) - at - FRAME.size < size:
                break
            yield pickle.loads(view[at + FRAME.size : at + FRAME.size + size])
            at += FRAME.size + size
        view.release()
        del buffer[:at]
        sender.report()


def _background(nice: int) -> None:
    """Run as background work: SCHED_BATCH (Linux: a wake-up does not pre-empt the request
    path's thread), and ``nice`` if set (the buffer absorbs the delay; at 5 on two cores this
    process fell behind 120k events/s and dropped a fifth of them)."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # a container may refuse it: only scheduling is at stake
            log.debug("SCHED_BATCH refused: %s", exc)
    if nice:
        os.nice(nice)


def main() -> int:
    fd = sys.stdin.buffer.fileno()
    out = sys.stdout.buffer
    first = _read_exact(fd, FRAME.size)
    if first is None:
        return 0
    payload = _read_exact(fd, FRAME.unpack(first)[0])
    if payload is None:
        return 0
    kind, nice, settings_data, producer_config, flush_timeout_s, level = pickle.loads(payload)
    assert kind == "config"
    _background(nice)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    sender = _Sender(Settings.model_validate(settings_data), producer_config, out)
    sender.report(force=True)  # ready
    for message in _frames(fd, sender):
        sender.handle(message)
    remaining = sender.producer.settle(flush_timeout_s)
    if sender.alerts is not None:
        sender.alerts.settle(flush_timeout_s)
    sender.report(force=True)  # what is still in librdkafka's queue is lost with this process
    if remaining:
        log.warning(
            "event log: %d events not delivered after %.0fs (broker down?)", remaining, flush_timeout_s
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
