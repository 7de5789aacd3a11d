"""Headwater: an event-driven ML platform centred on Kafka."""

from typing import Any

from headwater.errors import ConfigError, HeadwaterError, NotFoundError
from headwater.settings import Settings, load_settings

__all__ = [
    "ConfigError",
    "FeatureStore",
    "HeadwaterError",
    "NotFoundError",
    "PredictionClient",
    "Settings",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    # The SDK pulls in the stores and feature engine; load it on first use so that
    # `import headwater` (the CLI's settings and errors) stays light.
    if name == "FeatureStore":
        from headwater.sdk import FeatureStore

        return FeatureStore
    if name == "PredictionClient":
        from headwater.client import PredictionClient

        return PredictionClient
    raise AttributeError(f"module 'headwater' has no attribute {name!r}")
