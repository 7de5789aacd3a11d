"""`headwater up`, `down` and `status`: the local stack (for now the embedded Kafka broker and topics)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import typer
from confluent_kafka import KafkaException

from headwater.cli.common import admin_client, console, ensure_topics, settings_of
from headwater.settings import Settings
from streams.broker import EmbeddedBroker, resolve_bootstrap
from streams.topics import TopicCatalog

__all__ = ["Stack", "register", "start_stack", "stop_stack"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stack:
    """What `start_stack` found or started."""

    bootstrap: str
    broker_pid: int | None  # None: an external Kafka cluster (bootstrap_servers is set)
    started: bool  # True if this call started the broker (so the caller may stop it)
    topics_created: int
    topics_existing: int


def start_stack(settings: Settings) -> Stack:
    """Start the embedded broker unless ``bootstrap_servers`` is set or it runs already; create topics."""
    pid: int | None = None
    started = False
    if not settings.bootstrap_servers:
        broker = EmbeddedBroker(settings)
        running = broker.info()
        info = running or broker.start()
        pid, started = info.pid, running is None
    bootstrap = resolve_bootstrap(settings)
    created, existing = ensure_topics(settings)
    return Stack(bootstrap, pid, started, len(created), len(existing))


def stop_stack(settings: Settings) -> int | None:
    """Stop the embedded broker of this data directory; returns its pid, or None if none ran."""
    broker = EmbeddedBroker(settings)
    info = broker.info()
    if info is None or not broker.stop():
        return None
    return info.pid


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


def up(ctx: typer.Context) -> None:
    """Start the embedded Kafka broker (unless bootstrap_servers is set) and create every topic."""
    settings = settings_of(ctx)
    stack = start_stack(settings)
    if stack.broker_pid is None:
        console.print(f"Kafka: external cluster at [bold]{stack.bootstrap}[/] (bootstrap_servers is set)")
    else:
        verb = "started" if stack.started else "already running"
        console.print(f"Kafka: embedded broker {verb}, pid {stack.broker_pid}, at [bold]{stack.bootstrap}[/]")
    console.print(f"topics: {stack.topics_created} created, {stack.topics_existing} already there")
    console.print(f"data dir: {settings.data_dir.resolve()}")


def down(ctx: typer.Context) -> None:
    """Stop the embedded broker of this data directory (its data is in memory and is lost)."""
    settings = settings_of(ctx)
    pid = stop_stack(settings)
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
