"""Headwater's daily Dagster assets, checks, job and schedule: ``build_definitions(settings)``.

The graph, per UTC day (a backfill's range is one run over all its days; see
:mod:`batch.assets.common`)::

    raw_clicks ─► feature_values ─► <model>/training_set ─► <model>/model ─► <model>/evaluation
         │              (checks: rows, missing values,           │
         │               freshness, label balance)               ▼
         └──────────────────────────────────────► <model>/batch_predictions ◄─ <model>/registered_model

one ``<model>/...`` chain per model spec (``settings.batch.model_specs``). The checks on
``raw_clicks`` and ``<model>/training_set`` are blocking: bad data stops training with a
message saying what is wrong. :mod:`batch.definitions` builds these from the entry point's
settings; tests and tools build their own with their settings.
"""

from __future__ import annotations

import warnings

from dagster import (
    AssetChecksDefinition,
    AssetsDefinition,
    AssetSelection,
    BetaWarning,
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    PreviewWarning,
    build_schedule_from_partitioned_job,
    define_asset_job,
    in_process_executor,
    materialize,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from batch.assets.common import RESOURCE_KEY, Warehouse, Window, daily_partitions
from batch.assets.events import build_event_assets, build_event_checks
from headwater.settings import Settings

__all__ = [
    "DAILY_JOB",
    "RESOURCE_KEY",
    "Warehouse",
    "Window",
    "build_definitions",
    "daily_assets",
    "materialize_days",
]

DAILY_JOB = "daily"


def daily_assets(
    settings: Settings,
) -> tuple[list[AssetsDefinition], list[AssetChecksDefinition]]:
    """Every asset and check of the daily graph for ``settings`` (specs loaded and validated here)."""
    from batch.assets.models import build_model_assets, build_model_checks
    from models.spec import load_specs
    from processors.worker import load_repository

    partitions = daily_partitions(settings)
    repository = load_repository(settings)
    specs = load_specs(settings, repository)
    with warnings.catch_warnings():
        # Single-run backfills (beta) and partitioned checks (preview) are what ranges need.
        warnings.simplefilter("ignore", BetaWarning)
        warnings.simplefilter("ignore", PreviewWarning)
        assets: list[AssetsDefinition] = build_event_assets(partitions)
        checks: list[AssetChecksDefinition] = build_event_checks(partitions)
        for spec in specs:
            assets += build_model_assets(spec, repository, partitions, settings.batch.training_lookback_days)
            checks += build_model_checks(spec, partitions)
    return assets, checks


def build_definitions(settings: Settings) -> Definitions:
    """Assets, checks, the daily job and its schedule, and the settings as the ``headwater`` resource."""
    assets, checks = daily_assets(settings)
    job = define_asset_job(
        DAILY_JOB,
        selection=AssetSelection.all(),
        partitions_def=daily_partitions(settings),
        description="The daily batch: raw events, feature values, training sets, models, registry, "
        "batch predictions.",
    )
    schedule = build_schedule_from_partitioned_job(job, hour_of_day=settings.batch.schedule_hour)
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[job],
        schedules=[schedule],
        resources={RESOURCE_KEY: settings},
        # One process: chdb allows one engine per process, the steps run one after another
        # anyway, and a step per subprocess would pay the imports (~3 s) for each.
        executor=in_process_executor,
    )


def materialize_days(
    settings: Settings,
    first: str,
    last: str | None = None,
    *,
    instance: DagsterInstance | None = None,
    raise_on_error: bool = False,
    log_level: str = "DEBUG",
) -> ExecuteInProcessResult:
    """Run the whole daily graph in-process for one day, or for ``first..last`` as one run.

    What ``dagster asset materialize --partition[-range]`` does, for the main job and tests.
    ``log_level`` is that of Dagster's console logger (the main job keeps it to warnings).
    """
    assets, checks = daily_assets(settings)
    tags = None
    if last is not None and last != first:
        tags = {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}
    return materialize(
        [*assets, *checks],
        partition_key=None if tags else first,
        tags=tags,
        resources={RESOURCE_KEY: settings},
        instance=instance,
        raise_on_error=raise_on_error,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )
