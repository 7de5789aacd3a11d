"""What every command module shares: the settings of the invocation, consoles and small helpers."""

from __future__ import annotations

import base64
import json
from typing import Any

import typer
from confluent_kafka.admin import AdminClient
from rich.console import Console

from headwater.errors import HeadwaterError
from headwater.settings import Settings
from streams.catalog import SchemaCatalog
from streams.kafka import client_config
from streams.serde import Serde

__all__ = ["admin_client", "console", "require_data_dir", "serde_for", "settings_of", "step", "to_json"]

# Tables, progress and status go to stdout through rich; machine-readable output (tail's
# JSON lines) bypasses rich so that it never wraps or colours.
console = Console(highlight=False)


def settings_of(ctx: typer.Context) -> Settings:
    """The one Settings object built by the root callback (click passes ``obj`` down to subcommands)."""
    settings = ctx.obj
    if not isinstance(settings, Settings):
        raise HeadwaterError(
            "internal: the CLI was invoked without settings; use the `headwater` entry point"
        )
    return settings


def require_data_dir(settings: Settings) -> Settings:
    """For commands that read what a stack wrote (the lake, the online store): a data directory
    that does not exist is a mistaken --data-dir, not an empty platform."""
    where = settings.data_dir
    if not where.exists():
        raise HeadwaterError(
            f"data directory {where} does not exist: pass the --data-dir of a Headwater stack "
            "(where `headwater up` ran; default .headwater)"
        )
    if not where.is_dir():
        raise HeadwaterError(
            f"data directory {where} is not a directory: pass a Headwater stack's --data-dir"
        )
    lake = settings.offline_store.lake_dir
    if settings.offline_store.type == "chdb" and lake is not None and not lake.is_dir():
        raise HeadwaterError(f"offline_store.lake_dir {lake} does not exist: set it to the lake's directory")
    return settings


def step(n: int, title: str) -> None:
    """The heading of one step of a multi-step command (the demo)."""
    console.rule(f"[bold]{n}. {title}", align="left")


def serde_for(settings: Settings) -> Serde:
    return Serde(SchemaCatalog.load(settings.schemas_dir))


def admin_client(settings: Settings) -> AdminClient:
    """An admin client on the configured Kafka, or the running embedded broker (else a HeadwaterError)."""
    return AdminClient(client_config(settings))


def _json_default(value: object) -> Any:
    # Avro ``bytes`` fields (dead letters' original key and value) are not JSON: base64 them.
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(value: object) -> str:
    """One JSON line; bytes become base64 strings."""
    return json.dumps(value, ensure_ascii=False, default=_json_default)
