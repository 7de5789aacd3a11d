"""librdkafka configuration shared by every Headwater client (one place, so they agree)."""

from __future__ import annotations

import logging
from typing import Any

from headwater.settings import Settings
from streams.broker import resolve_bootstrap

__all__ = ["client_config", "kafka_logger"]

_rdkafka_log = logging.getLogger("streams.rdkafka")


def kafka_logger() -> logging.Logger:
    """librdkafka's own log lines go through logging instead of straight to stderr."""
    return _rdkafka_log


def client_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": resolve_bootstrap(settings),
        "socket.connection.setup.timeout.ms": 5000,
        "logger": _rdkafka_log,
    }
    config.update(settings.kafka_client)
    config.update(overrides)
    return config
