"""`headwater publish` and `headwater tail`: events in and out of topics as JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from headwater.cli.common import console, serde_for, settings_of, to_json
from headwater.errors import HeadwaterError
from streams.consumer import Event, EventConsumer
from streams.producer import EventProducer
from streams.serde import EncodeError
from streams.topics import TopicCatalog

__all__ = ["event_json", "register", "validate_line"]

log = logging.getLogger(__name__)

# Without --follow, tail gives up when the topic's end is not reached for this long.
_TAIL_IDLE_TIMEOUT_S = 30.0


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
def _open_lines(path: Path) -> Iterator[IO[str]]:
    if str(path) == "-":
        yield sys.stdin
        return
    with path.open(encoding="utf-8") as f:
        yield f


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

    Invalid lines are reported on stderr with their line number; the exit code is 1 if any was.
    """
    settings = settings_of(ctx)
    spec = TopicCatalog(settings).spec(topic)  # unknown topic: NotFoundError listing the known ones
    serde = serde_for(settings)
    fields = {f["name"] for f in serde.writer_schema(spec.event_type).raw["fields"]}
    published = invalid = 0
    with (
        _open_lines(file) as lines,
        EventProducer(settings, serde, client_id="headwater-publish") as producer,
    ):
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                producer.send(spec.logical, validate_line(line, fields))
            except (InvalidLineError, EncodeError) as exc:
                reason = str(exc)
            except KeyError as exc:  # the record key is derived from a field the line left to its default
                reason = f"field {exc} is needed for the record key"
            else:
                published += 1
                continue
            invalid += 1
            typer.echo(f"{file}:{lineno}: {' '.join(reason.split())}", err=True)  # one line each
        producer.flush()
    name = TopicCatalog(settings).name(spec.logical)
    console.print(
        f"{published} event{'s' * (published != 1)} published to {name}, "
        f"{invalid} invalid line{'s' * (invalid != 1)}"
    )
    if invalid:
        raise typer.Exit(1)


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
    """Print the topic's events as JSON lines (bytes as base64); stops when caught up unless --follow."""
    settings = settings_of(ctx)
    spec = TopicCatalog(settings).spec(topic)
    printed = 0
    idle_since = time.monotonic()
    with EventConsumer(
        settings,
        serde_for(settings),
        [spec.logical],
        group_id=None,
        from_beginning=from_beginning,
        name="tail",
    ) as consumer:
        while True:
            events = consumer.poll(max_records=500, timeout_s=0.5)
            for event in events:
                sys.stdout.write(event_json(event, meta=meta) + "\n")
                printed += 1
                if limit is not None and printed >= limit:
                    sys.stdout.flush()
                    return
            sys.stdout.flush()
            if follow:
                continue
            if consumer.caught_up():
                break
            if events:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > _TAIL_IDLE_TIMEOUT_S:
                raise HeadwaterError(
                    f"{spec.logical}: did not reach the end of the topic within {_TAIL_IDLE_TIMEOUT_S:.0f}s"
                )
    log.info("%s: %d events, caught up", spec.logical, printed)


def register(app: typer.Typer) -> None:
    app.command()(publish)
    app.command()(tail)
