"""The event consumer: decodes, dead-letters what it cannot decode, commits only when told.

Offsets are committed by :meth:`EventConsumer.commit` alone, which the caller invokes once
the effects of the returned events are durable; a crash before that re-delivers them.
Dead letters are flushed to the broker before any commit that passes them.

Catching up is detected with partition EOF events, never with listed high watermarks
(the embedded broker's ListOffsets answer is wrong after batched produces; DESIGN.md §3).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from headwater.errors import HeadwaterError
from headwater.settings import Settings
from streams.dead_letters import DeadLetters, oversized
from streams.kafka import client_config, message_limit
from streams.producer import EventProducer
from streams.serde import DecodeError, Serde
from streams.topics import TopicCatalog

__all__ = ["Event", "EventConsumer"]

log = logging.getLogger(__name__)


def _where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a fetched record (never None for a record, only for errors)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise HeadwaterError(f"record without coordinates: {msg.error()}")
    return topic, partition, offset


def _headers(msg: Message) -> dict[str, bytes]:
    raw = msg.headers()
    if not raw:
        return {}
    if type(raw) is list:
        # The usual case, per record on the hot path: librdkafka's (str, bytes) pairs. dict() keeps
        # the last value of a repeated key, as the general rule below does unless that is None.
        fast = dict(raw)
        if all(type(v) is bytes for v in fast.values()):
            return cast(dict[str, bytes], fast)
    items = raw.items() if isinstance(raw, dict) else raw
    return {k: v.encode() if isinstance(v, str) else v for k, v in items if v is not None}


_new_object = object.__new__
_set_attribute = object.__setattr__


def _event(  # noqa: PLR0917 - positional like Event(...), on the hot path
    topic: str, partition: int, offset: int, key: bytes | None, event_type: str, record: dict[str, Any],
    headers: dict[str, bytes], timestamp_ms: int, value: bytes | None, tombstone: bool,
) -> Event:  # fmt: skip
    """``Event(...)`` for the consumer's hot path: the frozen dataclass's ``__init__`` sets each of
    the ten fields through ``object.__setattr__`` (1.8 µs); filling the instance's ``__dict__`` at
    once makes the same object in 0.8 µs."""
    event: Event = _new_object(Event)
    _set_attribute(event, "__dict__", {
        "topic": topic, "partition": partition, "offset": offset, "key": key, "event_type": event_type,
        "record": record, "headers": headers, "timestamp_ms": timestamp_ms, "value": value,
        "tombstone": tombstone,
    })  # fmt: skip
    return event


@dataclass(frozen=True)
class Event:
    """One decoded record. ``tombstone`` records (null value) have an empty ``record``."""

    topic: str  # logical name, without prefix
    partition: int
    offset: int
    key: bytes | None
    event_type: str
    record: dict[str, Any]
    headers: dict[str, bytes]
    timestamp_ms: int
    value: bytes | None = field(default=None, repr=False)
    tombstone: bool = False


class EventConsumer:
    """Consume logical topics. ``group_id=None`` assigns every partition with no group and no commits.

    Such a reader (``tail``, a state reader in every service) skips a record it cannot decode with
    a warning (counted in ``undecodable``): dead-lettering is the job of the group that processes
    the topic, which would otherwise find the record once per reader in ``dead-letters``.
    """

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        topics: list[str],
        *,
        group_id: str | None = None,
        from_beginning: bool = True,
        name: str = "consumer",
        include_tombstones: bool = False,
        dead_letters: EventProducer | None = None,
        config: dict[str, Any] | None = None,
        start_offsets: Callable[[str, int], int | None] | None = None,
    ) -> None:
        self.settings = settings
        self.serde = serde
        self.name = name
        self.catalog = TopicCatalog(settings)
        self.group_id = group_id
        self.include_tombstones = include_tombstones
        self._specs = {self.catalog.name(t): self.catalog.spec(t) for t in topics}
        # (physical topic, partition) -> where to start, overriding the group's committed offset:
        # processors that keep their input positions with their state start from there.
        self._start_offsets = start_offsets
        self._dead_letters = dead_letters
        self._owns_dead_letters = dead_letters is None
        self._letters: DeadLetters | None = None  # built on the first dead letter
        self.message_limit = message_limit(settings)
        self._pending: dict[tuple[str, int], int] = {}  # next offset to commit per partition
        self._assigned: set[tuple[str, int]] = set()
        self._eof: set[tuple[str, int]] = set()
        self.dead_lettered = 0
        self.undecodable = 0  # records a reader without a group skipped (it never dead-letters)
        conf = client_config(
            settings,
            **{
                "group.id": group_id or f"headwater-{name}-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest" if from_beginning else "latest",
                "enable.partition.eof": True,
                # Locally a group join otherwise takes ~23 s with the embedded broker (DESIGN.md §3).
                "session.timeout.ms": 6000,
                **(config or {}),
            },
        )
        self._consumer = Consumer(conf)
        if group_id is None:
            self._assign_all(OFFSET_BEGINNING if from_beginning else OFFSET_END)
        else:
            self._consumer.subscribe(list(self._specs), on_assign=self._on_assign, on_revoke=self._on_revoke)

    def _assign_all(self, start: int) -> None:
        try:
            metadata = self._consumer.list_topics(timeout=10)
        except KafkaException as exc:
            raise HeadwaterError(
                f"{self.name}: cannot read topic metadata: {exc}; is the broker up?"
            ) from exc
        partitions = []
        for name in self._specs:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                raise HeadwaterError(f"topic {name} does not exist: run `headwater topics create`")
            partitions += [TopicPartition(name, p, start) for p in topic.partitions]
        self._consumer.assign(partitions)
        self._assigned = {(tp.topic, tp.partition) for tp in partitions}

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._start_offsets is not None:
            for tp in partitions:
                start = self._start_offsets(tp.topic, tp.partition)
                tp.offset = OFFSET_BEGINNING if start is None else start
            consumer.assign(partitions)
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("%s assigned %s", self.name, [(tp.topic, tp.partition) for tp in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Offsets of events whose effects are not yet durable must not be committed by a new owner.
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            self._eof.discard((tp.topic, tp.partition))
            self._pending.pop((tp.topic, tp.partition), None)

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Event]:
        """Up to ``max_records`` decoded events; undecodable records go to dead letters instead."""
        events: list[Event] = []
        append, pending, eof, decode = events.append, self._pending, self._eof, self._decode
        for msg in self._consumer.consume(max_records, timeout_s):
            err = msg.error()
            if err is not None:
                topic, partition = msg.topic() or "", msg.partition() or 0
                if err.code() == KafkaError._PARTITION_EOF:
                    eof.add((topic, partition))
                    continue
                if err.fatal():
                    raise HeadwaterError(f"{self.name}: fatal consumer error: {err}")
                log.warning("%s: consumer error on %s [%s]: %s", self.name, topic, partition, err)
                continue
            topic, partition, offset = _where(msg)
            tp = (topic, partition)
            eof.discard(tp)
            pending[tp] = offset + 1
            event = decode(msg, topic, partition, offset)
            if event is not None:
                append(event)
        return events

    def _decode(self, msg: Message, topic: str, partition: int, offset: int) -> Event | None:
        spec = self._specs[topic]
        value = msg.value()
        if value is None:
            if not self.include_tombstones:
                return None
            record: dict[str, Any] = {}
        else:
            too_large = oversized(msg.key(), value, msg.headers(), self.message_limit)
            if too_large is not None:
                self.dead_letter(msg, too_large)
                return None
            try:
                _, record = self.serde.decode(value, spec.event_type)
            except DecodeError as exc:
                if self.group_id is None:
                    self.undecodable += 1
                    log.warning(
                        "%s: skipping %s [%d] @%d, not decodable: %s",
                        self.name,
                        topic,
                        partition,
                        offset,
                        exc,
                    )
                else:
                    self.dead_letter(msg, exc)
                return None
        return _event(
            spec.logical, partition, offset, msg.key(), spec.event_type, record,
            _headers(msg), msg.timestamp()[1], value, value is None,
        )  # fmt: skip

    def dead_letter(self, msg: Message | Event, error: BaseException) -> None:
        """Route one record to the dead-letters topic with where it came from, the error and its
        bytes (:class:`streams.dead_letters.DeadLetters`: cut to fit, or skipped and counted)."""
        if isinstance(msg, Event):
            topic = self.catalog.name(msg.topic)
            partition, offset = msg.partition, msg.offset
            key, value, headers = msg.key, msg.value, msg.headers
        else:
            topic, partition, offset = _where(msg)
            key, value, headers = msg.key(), msg.value(), _headers(msg)
        if self._letters is None:
            if self._dead_letters is None:
                self._dead_letters = EventProducer(self.settings, self.serde, client_id=f"{self.name}-dlq")
            self._letters = DeadLetters(self._dead_letters, self.name, self.message_limit)
        self._letters.send(topic, partition, offset, error, key, value, headers)
        self.dead_lettered += 1

    @property
    def dead_letters_lost(self) -> int:
        """Records that could not be dead-lettered and were skipped (logged at ERROR)."""
        return 0 if self._letters is None else self._letters.lost

    def assignment(self) -> set[tuple[str, int]]:
        """The (physical topic, partition) pairs this consumer reads."""
        return set(self._assigned)

    def at_end(self, topic: str, partition: int) -> bool:
        """True when the partition reached its end and nothing newer has arrived since."""
        return (topic, partition) in self._eof

    def pause(self, partitions: list[tuple[str, int]]) -> None:
        self._consumer.pause([TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions: list[tuple[str, int]]) -> None:
        self._consumer.resume([TopicPartition(t, p) for t, p in partitions])

    def caught_up(self) -> bool:
        """True when every assigned partition has reached its end since its last record."""
        return bool(self._assigned) and self._assigned <= self._eof

    def pending(self) -> dict[tuple[str, int], int]:
        """Next offset per partition of everything returned (or dead-lettered) since the last commit."""
        return dict(self._pending)

    def commit(self, positions: dict[tuple[str, int], int] | None = None) -> None:
        """Commit everything returned so far (or the given next offsets); call once effects are durable."""
        positions = dict(self._pending) if positions is None else positions
        if self.group_id is None or not positions:
            return
        if self._dead_letters is not None:
            self._dead_letters.flush()
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        self._consumer.commit(offsets=offsets, asynchronous=False)
        for tp, offset in positions.items():
            if self._pending.get(tp) == offset:
                del self._pending[tp]

    def close(self) -> None:
        if self._dead_letters is not None and self._owns_dead_letters:
            self._dead_letters.close()
        self._consumer.close()

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
