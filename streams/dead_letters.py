"""Dead letters: the records a consumer could not take, on the ``dead-letters`` topic.

A record that cannot be processed (undecodable, unknown schema, out-of-range values, over the
message limit, or one a processor's logic failed on) is sent here with where it came from, the
error and its original bytes, and the consumer moves on: no single record stops a processor.

Two things could still stop one, and are handled here once for every engine:

* A dead letter holding a record at or over the broker's message limit would itself be over it
  (librdkafka refuses to produce it, and the processor used to crash on it, again at every
  restart). The dead letter keeps the original value's size and SHA-256 and, when it would not
  fit, only as many of the original bytes as fit (``truncated``; key and headers are cut too if
  they alone are too large). The error text is cut to :data:`MAX_ERROR_CHARS` characters.
* A dead letter that cannot be sent at all (its schema missing from the catalog, a producer or
  broker refusing it, its delivery failing) is *skipped*: logged once at ERROR with the source
  topic, partition and offset, and counted in :attr:`DeadLetters.lost`. The record itself is one
  the processor could not use anyway, so skipping it changes no value computed from the valid
  ones, and its bytes stay on the source topic at the logged offset for as long as the topic
  keeps them. Stopping the processor instead would freeze every value downstream of it for one
  unusable record, and a restart would meet the same record and stop again: the crash loop this
  module exists to prevent. (A failure to publish a processor's *outputs* is different: that
  would lose valid results, so it still fails the batch and nothing is committed past it.)
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, Message

from headwater.errors import HeadwaterError
from streams.kafka import RECORD_OVERHEAD_BYTES
from streams.producer import EventProducer

__all__ = ["MAX_ERROR_CHARS", "DeadLetters", "OversizedRecordError", "dead_letter_record", "oversized"]

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1000
# Room left in a dead letter's message for its key (the source topic's name, at most 249 bytes),
# its headers (event type and trace id) and librdkafka's per-record overhead.
_ENVELOPE_BYTES = 1024
_HEADER_OVERHEAD_BYTES = 4


class OversizedRecordError(HeadwaterError):
    """A record over the platform's message limit: its producer allowed more than Headwater's do."""


def oversized(
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, Any]] | Mapping[str, Any] | None,
    limit: int,
) -> OversizedRecordError | None:
    """The error for a record that librdkafka would refuse to produce at ``limit``
    (``message.max.bytes``): key, value, headers and per-record overhead; None if it fits.

    On the consumers' hot path: records under half the limit cost one comparison."""
    size = len(value) if value is not None else 0
    if size <= limit // 2:
        return None
    size += (len(key) if key is not None else 0) + RECORD_OVERHEAD_BYTES
    for name, header in headers.items() if isinstance(headers, Mapping) else headers or ():
        # Each header's own lengths take a few bytes more (3 for a 500-byte header, measured).
        size += len(name.encode()) + (len(header) if header is not None else 0) + _HEADER_OVERHEAD_BYTES
    if size <= limit:
        return None
    return OversizedRecordError(
        f"record of {size} bytes (key, value and headers) is over the message limit of {limit} bytes "
        "(kafka_client message.max.bytes): its producer allows larger records than the platform can "
        "re-publish; send it in smaller events"
    )


def dead_letter_record(  # noqa: PLR0917 - the record's fields, in its order
    topic: str,
    partition: int,
    offset: int,
    consumer: str,
    error: BaseException,
    key: bytes | None,
    value: bytes | None,
    headers: Mapping[str, bytes],
) -> dict[str, Any]:
    """The ``dead-letters`` event of a record (physical topic) that ``consumer`` could not take:
    where it came from, the error and its bytes as they were (before :func:`fit`)."""
    message = str(error)
    if len(message) > MAX_ERROR_CHARS:  # never echo unbounded input
        message = f"{message[: MAX_ERROR_CHARS - 40]}... ({len(message)} characters)"
    return {
        "event_id": f"{topic}/{partition}/{offset}",
        "event_time": int(time.time() * 1000),
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "consumer": consumer,
        "error_type": type(error).__name__,
        "error": message,
        "original_key": key,
        "original_value": value,
        "original_headers": dict(headers),
        "original_value_size": None if value is None else len(value),
        "original_value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        "truncated": False,
    }


def fit(record: dict[str, Any], budget: int, size_of: Callable[[dict[str, Any]], int]) -> dict[str, Any]:
    """``record`` with its original value (then key, then headers) cut so that its encoding takes
    at most ``budget`` bytes; ``truncated`` says if anything was cut. Raises ValueError if even
    the bare record does not fit."""
    size = size_of(record)
    for field in ("original_value", "original_key"):
        if size <= budget:
            return record
        original = record[field]
        if original:
            # A length's varint may shrink by a few bytes too: cut 8 more than the excess.
            keep = max(0, len(original) - (size - budget) - 8)
            record = {**record, field: original[:keep], "truncated": True}
            size = size_of(record)
    if size > budget and record["original_headers"]:
        record = {**record, "original_headers": {}, "truncated": True}
        size = size_of(record)
    if size > budget:
        raise ValueError(f"a dead letter of {size} bytes without its original bytes is over {budget}")
    return record


class DeadLetters:
    """Sends one consumer's dead letters on a producer; see the module docstring."""

    def __init__(self, producer: EventProducer, consumer: str, message_limit: int) -> None:
        self.producer = producer
        self.consumer = consumer
        self.budget = message_limit - _ENVELOPE_BYTES
        self.sent = 0  # handed to the producer
        self.lost = 0  # could not be sent or delivered: skipped, logged, counted

    def send(  # noqa: PLR0917 - the record's coordinates and contents
        self,
        topic: str,
        partition: int,
        offset: int,
        error: BaseException,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes],
    ) -> None:
        """Dead-letter one record of physical ``topic``; never raises (a failure is a skip)."""
        log.warning("%s: dead-lettering %s [%d] @%d: %s", self.consumer, topic, partition, offset, error)
        try:
            record = dead_letter_record(topic, partition, offset, self.consumer, error, key, value, headers)
            record = fit(record, self.budget, self._size)
            self.producer.send(
                "dead-letters", record, on_delivery=partial(self._delivered, topic, partition, offset)
            )
        except Exception as exc:  # any failure to dead-letter: skipped, see the module docstring
            self._skip(topic, partition, offset, exc)
            return
        self.sent += 1

    def _size(self, record: dict[str, Any]) -> int:
        return len(self.producer.serde.encode("dead_letter", record))

    def _delivered(
        self, topic: str, partition: int, offset: int, err: KafkaError | None, _msg: Message
    ) -> None:
        if err is not None:
            self.sent -= 1
            self._skip(topic, partition, offset, err)

    def _skip(self, topic: str, partition: int, offset: int, error: object) -> None:
        self.lost += 1
        log.error(
            "%s: cannot dead-letter %s [%d] @%d (%s); skipped it (%d skipped so far): it stays on its "
            "topic at that offset",
            self.consumer, topic, partition, offset, error, self.lost,
        )  # fmt: skip
