"""What every daily asset shares: the partitions, the run's time window, the settings, the warehouse.

Every asset has a single-run backfill policy: a backfill of a date range is *one* run whose
window spans the range (``dagster asset materialize --partition-range`` needs it, and the
work is range-shaped anyway: one backfill per feature set, one model per range). Outputs
that are per day (raw clicks, predictions) are files per day; outputs that are per run
(training set, model, evaluation) are files named by the window's key, the day
(``2019-11-27``) or the range (``2019-11-24..2019-11-27``), so re-running a partition rewrites
the same files.

The warehouse is a folder of Parquet (and JSON) files under ``settings.warehouse_dir``::

    <warehouse>/<table>/<model or "">/<key>.parquet

written to a temporary name and renamed into place, so a reader never sees half a file.
ClickHouse queries them with ``file()`` (:meth:`Warehouse.relation`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    DailyPartitionsDefinition,
    asset,
)

from batch.assets.quality import Finding
from headwater.errors import ConfigError, HeadwaterError
from headwater.files import atomic_write
from headwater.settings import Settings

__all__ = [
    "DAY_MS",
    "RESOURCE_KEY",
    "SINGLE_RUN",
    "Warehouse",
    "Window",
    "check_result",
    "daily_asset",
    "daily_partitions",
    "day_bounds",
    "parquet_bytes",
    "settings_of",
    "window_of",
]

DAY_MS = 86_400_000
RESOURCE_KEY = "headwater"  # the resource holding the one Settings object
SINGLE_RUN = BackfillPolicy.single_run()

Context = AssetExecutionContext | AssetCheckExecutionContext


def daily_partitions(settings: Settings) -> DailyPartitionsDefinition:
    """UTC days from ``settings.batch.partitions_start``; the newest is the last complete day."""
    try:
        date.fromisoformat(settings.batch.partitions_start)
    except ValueError as exc:
        raise ConfigError(
            f"batch.partitions_start {settings.batch.partitions_start!r} is not a date: use YYYY-MM-DD"
        ) from exc
    return DailyPartitionsDefinition(start_date=settings.batch.partitions_start, timezone="UTC")


def daily_asset(
    partitions: DailyPartitionsDefinition, **kwargs: Any
) -> Callable[[Callable[..., Any]], AssetsDefinition]:
    """``@asset`` for the daily graph: partitioned, single-run backfills, the settings resource."""
    decorator: Callable[[Callable[..., Any]], AssetsDefinition] = asset(
        partitions_def=partitions,
        backfill_policy=SINGLE_RUN,
        required_resource_keys={RESOURCE_KEY},
        **kwargs,
    )
    return decorator


def day_bounds(day: str) -> tuple[int, int]:
    """``[start, end)`` of a UTC day ``YYYY-MM-DD`` in epoch ms."""
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    ms = int(start.timestamp() * 1000)
    return ms, ms + DAY_MS


@dataclass(frozen=True)
class Window:
    """The days a run covers: one partition, or a backfill's range."""

    days: tuple[str, ...]

    @property
    def key(self) -> str:
        """Names the run's per-window files: the day, or ``first..last``."""
        return self.days[0] if len(self.days) == 1 else f"{self.days[0]}..{self.days[-1]}"

    @property
    def start_ms(self) -> int:
        return day_bounds(self.days[0])[0]

    @property
    def end_ms(self) -> int:
        return day_bounds(self.days[-1])[1]

    def with_lookback(self, days: int) -> Window:
        """This window preceded by ``days`` more days (the training window)."""
        first = date.fromisoformat(self.days[0])
        before = tuple((first - timedelta(days=d)).isoformat() for d in range(days, 0, -1))
        return Window(before + self.days)


def window_of(context: Context) -> Window:
    """The run's window: every partition key of the run (a single-run backfill has many)."""
    keys = tuple(context.partition_keys) if context.has_partition_key_range else (context.partition_key,)
    if not keys:
        raise HeadwaterError("the run names no partition: pick a day or a range of days")
    return Window(keys)


def settings_of(context: Context) -> Settings:
    settings = getattr(context.resources, RESOURCE_KEY)
    if not isinstance(settings, Settings):
        raise ConfigError(f"resource {RESOURCE_KEY!r} must be a headwater Settings, got {type(settings)}")
    return settings


def check_result(finding: Finding) -> AssetCheckResult:
    """A quality finding as Dagster's check result (failed: ERROR severity, which blocks)."""
    return AssetCheckResult(passed=finding.passed, description=finding.message, metadata=finding.metadata)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes: the same table gives the same bytes (content-addressed artifacts)."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class Warehouse:
    """Parquet and JSON files of the daily assets under ``settings.warehouse_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.warehouse_dir.resolve()

    def path(self, table: str, key: str, *, model: str = "", suffix: str = ".parquet") -> Path:
        folder = self.root / table / model if model else self.root / table
        return folder / f"{key}{suffix}"

    def write(self, table: str, key: str, data: pa.Table, *, model: str = "") -> Path:
        return atomic_write(self.path(table, key, model=model), parquet_bytes(data))

    def read(self, table: str, key: str, *, model: str = "", needed_by: str = "") -> pa.Table:
        path = self.path(table, key, model=model)
        if not path.is_file():
            raise HeadwaterError(
                f"{path} does not exist: materialize {table} for {key} first"
                + (f" (needed by {needed_by})" if needed_by else "")
            )
        return pq.read_table(path)

    def write_json(self, table: str, key: str, data: Mapping[str, Any], *, model: str = "") -> Path:
        text = json.dumps(data, sort_keys=True, indent=1, default=str)
        return atomic_write(self.path(table, key, model=model, suffix=".json"), text.encode())

    def read_json(self, table: str, key: str, *, model: str = "", needed_by: str = "") -> dict[str, Any]:
        path = self.path(table, key, model=model, suffix=".json")
        if not path.is_file():
            raise HeadwaterError(
                f"{path} does not exist: materialize {table} for {key} first"
                + (f" (needed by {needed_by})" if needed_by else "")
            )
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def relation(self, table: str, *, model: str = "") -> str:
        """ClickHouse table expression over every file of a table: ``SELECT * FROM <relation>``."""
        folder = self.root / table / model if model else self.root / table
        glob = str(folder / "*.parquet").replace("\\", "\\\\").replace("'", "\\'")
        return f"file('{glob}', Parquet)"
