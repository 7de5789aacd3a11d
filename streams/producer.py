"""The event producer: idempotent, batched, Avro single-object encoded, with delivery reports.

``send`` never waits for the broker: records are queued in librdkafka and delivered in
batches; ``flush`` waits and raises if anything failed. Keys come from the topic catalog
so that compaction and partitioning agree everywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from headwater.errors import HeadwaterError
from headwater.settings import Settings
from streams.kafka import client_config
from streams.serde import Serde
from streams.topics import TopicCatalog, TopicSpec

__all__ = ["EventProducer"]

log = logging.getLogger(__name__)


# A random (version 4) UUID's bits, as uuid.uuid4() sets them, in a third of its time.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def _trace_id() -> str:
    """``uuid.uuid4().hex``, without building a UUID object for every record."""
    return f"{int.from_bytes(os.urandom(16), 'big') & _UUID4_CLEAR | _UUID4_SET:032x}"


class EventProducer:
    """Encode and produce events to logical topics."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        *,
        client_id: str = "headwater",
        config: dict[str, Any] | None = None,
        log_failures: bool = True,
    ) -> None:
        """``log_failures=False``: no log line per failed delivery (``failed`` and ``last_error``
        still count them), for a caller that reports its losses itself, one line per interval."""
        self.serde = serde
        self.log_failures = log_failures
        self.topics = TopicCatalog(settings)
        conf = client_config(
            settings,
            **{
                "client.id": client_id,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "batch.num.messages": 10000,
                "compression.type": "lz4",
                **(config or {}),
            },
        )
        self._producer = Producer(conf)
        self._routes: dict[str, tuple[TopicSpec, str]] = {}  # logical topic -> (spec, physical name)
        self.delivered = 0
        # Next offset after the last record delivered, per (physical topic, partition): how far a
        # reader of this producer's output must get to have seen all of it.
        self.produced: dict[tuple[str | None, int | None], int] = {}
        self.failed = 0
        self.last_error: KafkaError | None = None

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            # Offsets grow per partition in delivery order (idempotent producer): the last is the highest.
            self.produced[(msg.topic(), msg.partition())] = msg.offset() + 1  # type: ignore[operator]
            return
        self.failed += 1
        self.last_error = err
        if self.log_failures:
            log.error("delivery to %s [%s] failed: %s", msg.topic(), msg.partition(), err)

    def send(
        self,
        topic: str,
        record: dict[str, Any],
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        """Encode ``record`` with the topic's schema and queue it; EncodeError if it does not fit.

        ``on_delivery``, when given, takes this record's delivery report instead of the
        producer's own (which counts failures that make :meth:`flush` raise)."""
        # Per-record work is on the feature processor's hot path: the topic's spec and physical
        # name are looked up once per topic, and the header list is built directly when no
        # extra headers are given.
        route = self._routes.get(topic)
        if route is None:
            spec = self.topics.spec(topic)
            route = self._routes[topic] = (spec, self.topics.name(spec.logical))
        spec, name = route
        value = self.serde.encode(spec.event_type, record)
        if headers:
            hdrs = {"event_type": spec.event_type, "trace_id": _trace_id(), **headers}
            header_list: list[tuple[str, str | bytes | None]] = [(k, v) for k, v in hdrs.items()]
        else:
            header_list = [("event_type", spec.event_type), ("trace_id", _trace_id())]
        self.send_raw(
            name,
            value,
            key=(key if key is not None else spec.key(record)).encode(),
            headers=header_list,
            on_delivery=on_delivery,
        )

    def _reporting_to(
        self, on_delivery: Callable[[KafkaError | None, Message], None]
    ) -> Callable[[KafkaError | None, Message], None]:
        """A delivery report for ``on_delivery`` that still counts a success as the producer's own."""

        def report(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                self._on_delivery(None, msg)
            on_delivery(err, msg)

        return report

    def send_raw(
        self,
        topic_name: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
        partition: int | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        """Queue already-encoded bytes to a physical topic (restores, dead letters, tests)."""
        target = -1 if partition is None else partition  # -1: librdkafka's partitioner decides
        report = self._on_delivery if on_delivery is None else self._reporting_to(on_delivery)
        while True:
            try:
                self._producer.produce(
                    topic_name, value, key, partition=target, headers=headers, on_delivery=report
                )
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.1)
        self._producer.poll(0)

    def try_send_many(
        self,
        topic_name: str,
        values: Sequence[bytes],
        keys: Sequence[str],
        *,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> int:
        """:meth:`send_raw` for many records (``values[i]`` keyed by ``keys[i]``) that never waits:
        returns how many librdkafka refused, because its bounded queue is full (the broker is
        away or slow) or it will not take that record (larger than ``message.max.bytes``), so
        the caller can count drops and go on. A fatal error (the producer is unusable: make a
        new one) raises. The per-record Python work is the ``produce`` call alone."""
        produce, on_delivery = self._producer.produce, self._on_delivery
        refused = 0
        for key, value in zip(keys, values, strict=True):
            try:
                produce(topic_name, value, key, headers=headers, on_delivery=on_delivery)
            except BufferError:
                refused += 1
            except KafkaException as exc:
                if exc.args[0].fatal():
                    raise
                self.last_error = exc.args[0]
                refused += 1
        return refused

    def poll(self) -> int:
        """Serve pending delivery reports without waiting (updates ``delivered``/``failed``);
        a producer that sends with :meth:`try_send_many` calls it from time to time."""
        served: int = self._producer.poll(0)
        return served

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued record is delivered; raise if any failed or remain."""
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise HeadwaterError(
                f"{remaining} records still undelivered after {timeout_s}s: is the broker up?"
            )
        if self.failed:
            raise HeadwaterError(f"{self.failed} records failed delivery; last error: {self.last_error}")

    def in_flight(self) -> int:
        """Records queued in librdkafka and not yet delivered or failed."""
        return len(self._producer)

    def settle(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for queued records to be delivered, without raising: how many
        remain (a caller that counts its losses, such as the event log's sender)."""
        remaining: int = self._producer.flush(timeout_s)
        return remaining

    def purge(self) -> int:
        """Drop every record not delivered yet (each counted in ``failed``), without waiting for
        the broker: before this producer is replaced. Returns how many were dropped."""
        before = self.failed
        self._producer.purge()
        self._producer.poll(0)  # their delivery reports, with _PURGE_QUEUE / _PURGE_INFLIGHT
        return self.failed - before

    def close(self) -> None:
        self._producer.flush(5.0)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
