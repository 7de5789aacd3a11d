"""`headwater publish` and `headwater tail`: events in and out of topics as JSON lines."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from confluent_kafka import KafkaError, KafkaException, Message

from headwater.cli.common import console, serde_for, settings_of, to_json
from headwater.errors import HeadwaterError
from headwater.settings import Settings
from streams.consumer import Event, EventConsumer
from streams.producer import EventProducer
from streams.serde import EncodeError
from streams.topics import TopicCatalog

__all__ = ["decode_line", "event_json", "register", "validate_line"]

log = logging.getLogger(__name__)

# Without --follow, tail gives up when the topic's end is not reached for this long.
_TAIL_IDLE_TIMEOUT_S = 30.0
# How long publish waits for the broker to acknowledge what it sent.
_FLUSH_TIMEOUT_S = 30.0
# librdkafka's default message.max.bytes, the limit when kafka_client does not set one.
_LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000


class InvalidLineError(ValueError):
    """A JSON line that cannot be an event of the topic; the message says why."""


def validate_line(line: str, fields: set[str]) -> dict[str, Any]:
    """Parse one JSON line into a record; the schema check itself is the encoding."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidLineError(f"not valid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise InvalidLineError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - fields)
    if unknown:
        # Avro encoding would silently drop them; a typo'd field name is almost always a mistake.
        raise InvalidLineError(
            f"unknown fields {', '.join(unknown)}; the schema has {', '.join(sorted(fields))}"
        )
    return record


@contextmanager
def _open_lines(path: Path) -> Iterator[IO[bytes]]:
    # Bytes, decoded line by line: one line that is not UTF-8 is reported, not fatal to the rest.
    if str(path) == "-":
        yield sys.stdin.buffer
        return
    with path.open("rb") as f:
        yield f


def decode_line(raw: bytes) -> str:
    """One line as text; InvalidLineError naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidLineError(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
        ) from exc


def _too_large(exc: KafkaException, settings: Settings) -> str:
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError) and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        limit = settings.kafka_client.get("message.max.bytes", _LIBRDKAFKA_MESSAGE_MAX_BYTES)
        return (
            f"the event (with its key) is larger than the message limit of {limit} bytes "
            "(kafka_client message.max.bytes, and the topic's max.message.bytes on the broker)"
        )
    return f"Kafka refused it: {err if err is not None else exc}"


def publish(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Logical topic, e.g. clicks or outcomes.")],
    file: Annotated[
        Path,
        typer.Option(
            "--file",
            "-f",
            help="JSON lines, one event each ('-' reads stdin).",
            exists=True,
            dir_okay=False,
            readable=True,
            allow_dash=True,
        ),
    ],
) -> None:
    """Validate JSON lines against the topic's event schema and produce the valid ones.

    Invalid lines (not UTF-8, not JSON, not the schema, over the message limit, refused by the
    broker) are reported on stderr as FILE:LINE: reason; the exit code is 1 if any was.
    """
    settings = settings_of(ctx)
    spec = TopicCatalog(settings).spec(topic)  # unknown topic: NotFoundError listing the known ones
    serde = serde_for(settings)
    fields = {f["name"] for f in serde.writer_schema(spec.event_type).raw["fields"]}
    sent = invalid = 0

    def report(lineno: int, reason: str) -> None:
        nonlocal invalid
        invalid += 1
        typer.echo(f"{file}:{lineno}: {' '.join(reason.split())}", err=True)  # one line each

    with (
        _open_lines(file) as lines,
        EventProducer(settings, serde, client_id="headwater-publish") as producer,
    ):
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = validate_line(decode_line(raw), fields)
                # The broker's refusal comes later, in a delivery report: it names the line too.
                producer.send(spec.logical, record, on_delivery=partial(_refused, report, lineno))
            except (InvalidLineError, EncodeError) as exc:
                reason = str(exc)
            except KeyError as exc:  # the record key is derived from a field the line left to its default
                reason = f"field {exc} is needed for the record key"
            except KafkaException as exc:  # refused by librdkafka before sending: too large
                reason = _too_large(exc, settings)
            else:
                sent += 1
                continue
            report(lineno, reason)
        remaining = producer.settle(_FLUSH_TIMEOUT_S)
    if remaining:
        raise HeadwaterError(
            f"{remaining} of {sent} events not delivered within {_FLUSH_TIMEOUT_S:.0f}s: is the broker up? "
            "(`headwater status`)"
        )
    published = producer.delivered
    name = TopicCatalog(settings).name(spec.logical)
    console.print(
        f"{published} event{'s' * (published != 1)} published to {name}, "
        f"{invalid} invalid line{'s' * (invalid != 1)}"
    )
    if invalid:
        raise typer.Exit(1)


def _refused(report: Callable[[int, str], None], lineno: int, err: KafkaError | None, _: Message) -> None:
    if err is None:
        return  # delivered: the producer counts it
    if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        report(lineno, f"the broker refused the event as larger than its message limit ({err.str()})")
    else:
        report(lineno, f"the broker refused the event: {err.str()}")


def event_json(event: Event, *, meta: bool) -> str:
    """The record alone (so tail output can be published again), or wrapped with where it came from."""
    if not meta:
        return to_json(event.record)
    return to_json(
        {
            "topic": event.topic,
            "partition": event.partition,
            "offset": event.offset,
            "key": event.key.decode(errors="replace") if event.key is not None else None,
            "timestamp_ms": event.timestamp_ms,
            "event_type": event.event_type,
            "headers": {k: v.decode(errors="replace") for k, v in event.headers.items()},
            "record": event.record,
        }
    )


def tail(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Logical topic, e.g. clicks.")],
    *,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning/--latest", help="Start at the oldest record or at the end.")
    ] = True,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep waiting for new events.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Stop after N events.")] = None,
    meta: Annotated[
        bool, typer.Option("--meta", help="Wrap each record with partition, offset, key, headers.")
    ] = False,
) -> None:
    """Print the topic's events as JSON lines (bytes as base64); stops when caught up unless --follow.

    A reader: records it cannot decode are skipped with a warning, never dead-lettered.
    """
    settings = settings_of(ctx)
    spec = TopicCatalog(settings).spec(topic)
    printed = 0
    idle_since = time.monotonic()
    started_ms = int(time.time() * 1000)
    # --latest: Kafka's "end" offset is looked up when a partition is first fetched, and the
    # embedded broker places it too early (at the base of the last batch: its ListOffsets answer
    # is wrong after batched produces), so records older than this command would show. Until a
    # partition has reached its end once, its records produced before the start are skipped.
    settled: set[int] = set()
    announced = False
    # SIGTERM ends a follow like Ctrl-C, between polls (the consumer closes, stdout is whole).
    # Installed explicitly: a process started with SIGTERM ignored (inherited) would never end.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    with EventConsumer(
        settings,
        serde_for(settings),
        [spec.logical],
        group_id=None,
        from_beginning=from_beginning,
        name="tail",
    ) as consumer:
        while not stop.is_set():
            events = consumer.poll(max_records=500, timeout_s=0.5)
            for event in events:
                if not from_beginning and event.partition not in settled and event.timestamp_ms < started_ms:
                    continue
                sys.stdout.write(event_json(event, meta=meta) + "\n")
                printed += 1
                if limit is not None and printed >= limit:
                    sys.stdout.flush()
                    return
            sys.stdout.flush()
            if not from_beginning:
                settled |= {p for t, p in consumer.assignment() if consumer.at_end(t, p)}
            if follow:
                if not announced and consumer.caught_up():
                    # On stderr, so stdout stays records only: from here on, every new event shows.
                    typer.echo(f"following {spec.logical} (caught up; Ctrl-C to stop)", err=True)
                    announced = True
                continue
            if consumer.caught_up():
                break
            if events:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > _TAIL_IDLE_TIMEOUT_S:
                raise HeadwaterError(
                    f"{spec.logical}: did not reach the end of the topic within {_TAIL_IDLE_TIMEOUT_S:.0f}s"
                )
    log.info("%s: %d events, %s", spec.logical, printed, "stopped" if stop.is_set() else "caught up")


def register(app: typer.Typer) -> None:
    app.command()(publish)
    app.command()(tail)
