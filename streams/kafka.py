"""librdkafka configuration shared by every Headwater client (one place, so they agree)."""

from __future__ import annotations

import logging
from typing import Any

from headwater.settings import Settings
from streams.broker import resolve_bootstrap

__all__ = ["RECORD_OVERHEAD_BYTES", "client_config", "kafka_logger", "message_limit"]

# librdkafka's own default for message.max.bytes: below a Kafka broker's default limit
# (1,048,588), so what our producers may send every broker takes.
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
# What librdkafka counts per record besides key, value and headers when it checks a record
# against message.max.bytes (measured: a record of key + value + headers + 36 bytes is the largest
# it produces).
RECORD_OVERHEAD_BYTES = 36

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


def message_limit(settings: Settings) -> int:
    """The largest record (key + value + headers + overhead) Headwater's producers send:
    librdkafka's ``message.max.bytes`` from ``settings.kafka_client``, else its default.

    It is the platform's message limit: a record over it on a source topic (written by a
    producer configured with a larger limit; the embedded broker enforces none) could not be
    re-published by the platform (not copied into a dead letter, restored or replayed), so
    consumers dead-letter it, truncated. Set it to the brokers' ``message.max.bytes`` or below.
    """
    configured = settings.kafka_client.get("message.max.bytes")
    return int(configured) if configured is not None else DEFAULT_MESSAGE_MAX_BYTES
