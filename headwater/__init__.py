"""Headwater: an event-driven ML platform centred on Kafka."""

from headwater.errors import ConfigError, HeadwaterError, NotFoundError
from headwater.settings import Settings, load_settings

__all__ = ["ConfigError", "HeadwaterError", "NotFoundError", "Settings", "load_settings"]
