"""`headwater topics create | list`: the topic catalog on the broker."""

from __future__ import annotations

import typer
from confluent_kafka import KafkaException
from rich.table import Column, Table

from headwater.cli.common import admin_client, console, settings_of
from headwater.errors import HeadwaterError
from infra.stack import ensure_topics
from streams.topics import TopicCatalog

__all__ = ["register"]

app = typer.Typer(help="The Headwater topics: list them, create the missing ones.", no_args_is_help=True)


@app.command("create")
def create(ctx: typer.Context) -> None:
    """Create every missing Headwater topic (with its partitions and cleanup policy)."""
    created, existing = ensure_topics(settings_of(ctx))
    for name in created:
        console.print(f"created {name}")
    console.print(f"{len(created)} topics created, {len(existing)} already there")


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List the topics: name, event type, partitions, compaction, and whether the broker has them."""
    settings = settings_of(ctx)
    catalog = TopicCatalog(settings)
    on_broker: dict[str, int] | None
    note = ""
    try:
        metadata = admin_client(settings).list_topics(timeout=5)
        on_broker = {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}
    except (HeadwaterError, KafkaException) as exc:
        on_broker = None
        note = f"broker not reachable, showing the catalog only: {exc}"
    table = Table(Column("topic", overflow="fold"), "event type", "partitions", "compacted", "on broker")
    for spec in catalog.specs():
        name = catalog.name(spec.logical)
        present = "?" if on_broker is None else ("yes" if name in on_broker else "no")
        table.add_row(
            name, spec.event_type, str(catalog.partitions(spec)), "yes" if spec.compacted else "", present
        )
    console.print(table)
    if note:
        console.print(note, soft_wrap=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="topics")
