"""`headwater up`, `down` and `status`: the local stack (embedded broker, topics, processors)."""

from __future__ import annotations

import logging
import time

import typer
from confluent_kafka import KafkaException

from headwater.cli.common import admin_client, console, settings_of
from infra.services import Services
from infra.stack import start_stack, stop_stack
from streams.broker import EmbeddedBroker
from streams.topics import TopicCatalog

__all__ = ["register"]

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {s:02d}s"
    return f"{minutes}m {s:02d}s" if minutes else f"{s}s"


def up(
    ctx: typer.Context,
    processors: bool = typer.Option(
        True, "--processors/--no-processors", help="Also run the stream processors."
    ),
    serving: bool = typer.Option(
        True, "--serving/--no-serving", help="Also run the gRPC prediction service."
    ),
) -> None:
    """Start the embedded Kafka broker (unless bootstrap_servers is set), topics, processors, serving."""
    settings = settings_of(ctx)
    stack = start_stack(settings, processors=processors, serving=serving)
    if stack.broker_pid is None:
        console.print(f"Kafka: external cluster at [bold]{stack.bootstrap}[/] (bootstrap_servers is set)")
    else:
        verb = "started" if stack.started else "already running"
        console.print(f"Kafka: embedded broker {verb}, pid {stack.broker_pid}, at [bold]{stack.bootstrap}[/]")
    console.print(f"topics: {stack.topics_created} created, {stack.topics_existing} already there")
    if stack.started:
        restored = (
            ", ".join(f"{t} {n:,}" for t, n in stack.restored.items() if n) or "nothing (the lake is empty)"
        )
        console.print(f"restored from the lake: {restored}")
    for service in stack.services:
        console.print(f"{service.name}: running, pid {service.pid}, log {service.log_file}")
    console.print(f"data dir: {settings.data_dir.resolve()}")


def down(ctx: typer.Context) -> None:
    """Stop the services and the embedded broker of this data directory."""
    settings = settings_of(ctx)
    services, pid = stop_stack(settings)
    for name in services:
        console.print(f"{name}: stopped")
    if pid is not None:
        console.print(f"embedded broker: stopped (pid {pid})")
    elif settings.bootstrap_servers:
        console.print(f"nothing to stop: Kafka at {settings.bootstrap_servers} is not managed by Headwater")
    else:
        console.print(f"embedded broker: not running (data dir {settings.data_dir})")


def status(ctx: typer.Context) -> None:
    """Show whether Kafka is up; exit code 1 when it is not."""
    settings = settings_of(ctx)
    if settings.bootstrap_servers:
        where = f"Kafka at {settings.bootstrap_servers}"
    else:
        info = EmbeddedBroker(settings).info()
        if info is None:
            console.print(f"embedded broker: not running (data dir {settings.data_dir})")
            raise typer.Exit(1)
        console.print(f"embedded broker: running, pid {info.pid}, at [bold]{info.bootstrap}[/]")
        console.print(f"uptime: {_duration(time.time() - info.started_at)}; log: {info.log_file}")
        where = "broker"
    try:
        metadata = admin_client(settings).list_topics(timeout=5)
    except KafkaException as exc:
        console.print(f"{where}: not reachable ({exc.args[0]})")
        raise typer.Exit(1) from None
    for service in Services(settings).all():
        console.print(
            f"{service.name}: running, pid {service.pid}, up {_duration(time.time() - service.started_at)}"
        )
    catalog = TopicCatalog(settings)
    ours = [s for s in catalog.specs() if catalog.name(s.logical) in metadata.topics]
    console.print(
        f"{where}: {len(metadata.brokers)} broker(s), {len(ours)}/{len(catalog.specs())} Headwater topics"
        + ("" if len(ours) == len(catalog.specs()) else " (run `headwater topics create`)")
    )


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(down)
    app.command()(status)
