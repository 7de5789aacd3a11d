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
Child to parent on stdout: one line per report, ``delivered broker encode`` as running
totals (prediction events the broker acknowledged; refused by librdkafka's full queue or not
delivered; not encoded). The parent counts everything else it submitted as not yet settled,
and as lost if this process dies. End of stdin: flush (up to ``flush_timeout_s``), report, exit.
Alerts have a producer of their own (made at the first one), so the counts are of predictions
only. Pickle is safe here: both ends are this program, over an anonymous pipe.

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

from headwater.settings import Settings
from serving.events import PredictionBatch, PredictionEncoder
from streams.catalog import SchemaCatalog
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog

__all__ = ["FRAME", "main"]

log = logging.getLogger(__name__)

FRAME = struct.Struct("<I")
_REPORT_INTERVAL_S = 0.05
_PREDICTION_HEADERS: list[tuple[str, str | bytes | None]] = [("event_type", b"prediction")]


class _Sender:
    def __init__(self, settings: Settings, producer_config: dict[str, Any], out: BinaryIO) -> None:
        self.serde = Serde(SchemaCatalog.load(settings.schemas_dir))
        self.producer = EventProducer(settings, self.serde, client_id="serving", config=producer_config)
        self.topic = TopicCatalog(settings).name("predictions")
        self.settings = settings
        self.alerts: EventProducer | None = None
        self.encoders: dict[int, PredictionEncoder] = {}
        self.out = out
        self.accepted = self.refused = self.unencoded = 0
        self._reported: tuple[int, ...] = ()
        self._last_report = 0.0

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "batches":
            encoders = self.encoders
            for eid, batch in message[1]:
                self._batch(encoders[eid], batch)
        elif kind == "encoder":
            self.encoders[message[1]] = PredictionEncoder(*message[2:])
        elif kind == "alert":
            try:
                if self.alerts is None:
                    self.alerts = EventProducer(self.settings, self.serde, client_id="serving-alerts")
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
        refused = self.producer.try_send_many(
            self.topic, values, batch.entity_keys, headers=_PREDICTION_HEADERS
        )
        self.accepted += n - refused
        self.refused += refused

    def report(self, force: bool = False) -> None:
        producer = self.producer
        producer.poll()
        if self.alerts is not None:
            self.alerts.poll()
        now = time.monotonic()
        if not force and now - self._last_report < _REPORT_INTERVAL_S:
            return
        delivered = self.accepted - producer.in_flight() - producer.failed
        totals = (delivered, self.refused + producer.failed, self.unencoded)
        if force or totals != self._reported:
            self.out.write(("{} {} {}\n".format(*totals)).encode())
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
