"""The one root exception type of Headwater.

Every error the platform raises on purpose is a :class:`HeadwaterError`; third-party
errors are translated at the boundary with ``raise ... from``. Messages say what to do next.
"""

from __future__ import annotations

__all__ = ["ConfigError", "HeadwaterError", "NotFoundError"]


class HeadwaterError(Exception):
    """Root of every error Headwater raises on purpose."""


class ConfigError(HeadwaterError):
    """Settings or a definition are wrong; the message names the field."""


class NotFoundError(HeadwaterError):
    """A named thing (topic, schema, feature, model) does not exist; the message lists what does."""
