"""The day's raw events and feature values: ``raw_clicks`` (+ its checks) and ``feature_values``.

``raw_clicks`` compacts a day of the ``clicks`` table of the offline store (the lake sink's
many small files, possibly with rows a crashed sink wrote twice) into one Parquet table per
day in the warehouse, one row per ``event_id``, in (event time, event id) order: re-running
a day rewrites the same file. Its checks are blocking, so a bad day stops everything
downstream (feature values, training, predictions) with the reason.

``feature_values`` recomputes the window's feature values of every feature set from the raw
events (:func:`batch.backfill.backfill`): into the lake, where point-in-time training sets
read them, and into the online store, newer-wins.
"""

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetExecutionContext,
    AssetsDefinition,
    DailyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    asset_check,
)

from batch.assets import quality
from batch.assets.common import (
    RESOURCE_KEY,
    Warehouse,
    check_result,
    daily_asset,
    day_bounds,
    settings_of,
    window_of,
)
from batch.backfill import backfill
from batch.offline_store import open_offline_store
from processors.worker import load_repository

__all__ = ["RAW_CLICKS", "build_event_assets", "build_event_checks"]

log = logging.getLogger(__name__)

RAW_CLICKS = "raw_clicks"
FEATURE_VALUES = "feature_values"

# One row per event id; of rows a crashed sink wrote twice, the first lake copy wins.
_DAY_SQL = """
    SELECT * EXCEPT (_ingest_time)
    FROM clicks
    WHERE event_time >= {start:Int64} AND event_time < {end:Int64}
    ORDER BY event_time, event_id, _partition, _offset
    LIMIT 1 BY event_id
"""


def build_event_assets(partitions: DailyPartitionsDefinition) -> list[AssetsDefinition]:
    @daily_asset(
        partitions,
        name=RAW_CLICKS,
        group_name="events",
        kinds={"clickhouse", "parquet"},
        description="The day's click events from the Parquet lake (offline store table `clicks`), "
        "deduplicated by event id, as one Parquet table per day in the warehouse.",
    )
    def raw_clicks(context: AssetExecutionContext) -> MaterializeResult[Any]:
        settings, window = settings_of(context), window_of(context)
        warehouse = Warehouse(settings)
        rows: dict[str, int] = {}
        with open_offline_store(settings) as store:
            store.refresh()
            for day in window.days:
                start, end = day_bounds(day)
                table = store.query(_DAY_SQL, {"start": start, "end": end})
                warehouse.write(RAW_CLICKS, day, table)
                rows[day] = table.num_rows
                log.info("raw_clicks %s: %d events", day, table.num_rows)
        return MaterializeResult(
            metadata={
                "rows": sum(rows.values()),
                "rows_per_day": MetadataValue.json(rows),
                "path": MetadataValue.path(str(warehouse.path(RAW_CLICKS, window.days[-1]))),
                "sql": MetadataValue.md(f"```sql\n{Warehouse(settings).relation(RAW_CLICKS)}\n```"),
            }
        )

    @daily_asset(
        partitions,
        name=FEATURE_VALUES,
        deps=[raw_clicks],
        group_name="features",
        kinds={"clickhouse", "lmdb"},
        description="Every feature set's values over the day, computed from the raw events by the "
        "ClickHouse backfill: into the lake (feature_updates) and the online store, newer-wins.",
    )
    def feature_values(context: AssetExecutionContext) -> MaterializeResult[Any]:
        settings, window = settings_of(context), window_of(context)
        repository = load_repository(settings)
        per_set: dict[str, dict[str, int | float]] = {}
        for fs in repository.feature_sets:
            result = backfill(
                settings, fs.name, window.start_ms, window.end_ms, repository=repository
            )  # fmt: skip
            per_set[fs.name] = {
                "updates": result.updates,
                "entities": result.entities,
                "online_written": result.online_written,
                "seconds": round(result.total_s, 3),
            }
        return MaterializeResult(
            metadata={
                "updates": sum(int(v["updates"]) for v in per_set.values()),
                "feature_sets": MetadataValue.json(per_set),
            }
        )

    return [raw_clicks, feature_values]


def _day_tables(context: AssetCheckExecutionContext) -> list[tuple[str, pa.Table]]:
    settings, window = settings_of(context), window_of(context)
    warehouse = Warehouse(settings)
    out = []
    for day in window.days:
        path = warehouse.path(RAW_CLICKS, day)
        out.append((day, pq.read_table(path) if path.is_file() else pa.table({})))
    return out


def build_event_checks(partitions: DailyPartitionsDefinition) -> list[AssetChecksDefinition]:
    common: dict[str, Any] = {
        "asset": RAW_CLICKS,
        "blocking": True,
        "partitions_def": partitions,
        "required_resource_keys": {RESOURCE_KEY},
    }

    @asset_check(name="rows", description="Every day has click events in the lake.", **common)
    def rows(context: AssetCheckExecutionContext) -> AssetCheckResult:
        min_rows = settings_of(context).batch.min_rows
        return check_result(
            quality.combine(quality.event_rows(day, t.num_rows, min_rows) for day, t in _day_tables(context))
        )

    @asset_check(
        name="missing_values", description="Click events name their user, item and action.", **common
    )
    def missing_values(context: AssetCheckExecutionContext) -> AssetCheckResult:
        limit = settings_of(context).batch.raw_max_missing_share
        return check_result(
            quality.combine(quality.event_missing_values(day, t, limit) for day, t in _day_tables(context))
        )

    @asset_check(
        name="freshness", description="The newest event of each day is close to the day's end.", **common
    )
    def freshness(context: AssetCheckExecutionContext) -> AssetCheckResult:
        limit = settings_of(context).batch.max_freshness_lag_s
        findings = []
        for day, table in _day_tables(context):
            newest = pc.max(table.column("event_time")).as_py() if table.num_rows else None
            findings.append(quality.event_freshness(day, newest, day_bounds(day)[1], limit))
        return check_result(quality.combine(findings))

    return [rows, missing_values, freshness]
