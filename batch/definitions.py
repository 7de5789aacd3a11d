"""The Dagster code location of Headwater: ``dagster dev -m batch.definitions``.

    dagster dev -m batch.definitions                       # the UI: assets, checks, schedule, backfills
    dagster asset materialize -m batch.definitions --select '*' --partition 2019-11-27
    dagster asset materialize -m batch.definitions --select '*' --partition-range 2019-11-24...2019-11-30

The settings are built here, at the entry point, like the CLI's (``HEADWATER_*`` variables,
``HEADWATER_CONFIG`` YAML, defaults) and handed to every asset as the ``headwater``
resource. Code that wants other settings calls :func:`batch.assets.build_definitions`.
"""

from __future__ import annotations

from batch.assets import build_definitions
from headwater.settings import load_settings

__all__ = ["defs"]

defs = build_definitions(load_settings())
