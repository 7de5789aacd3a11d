"""The offline store: ClickHouse SQL over every topic's history, and point-in-time training sets.

``open_offline_store(settings)`` picks the backend from ``settings.offline_store.type``:
``chdb`` (embedded, views over the Parquet lake) or ``clickhouse`` (a server, through
clickhouse-driver). :func:`get_historical_features` builds point-in-time correct training sets.
"""

from __future__ import annotations

from batch.offline_store.base import OfflineStore, QueryError, table_name
from batch.offline_store.historical import get_historical_features
from headwater.settings import Settings
from streams.catalog import SchemaCatalog

__all__ = ["OfflineStore", "QueryError", "get_historical_features", "open_offline_store", "table_name"]


def open_offline_store(settings: Settings, catalog: SchemaCatalog | None = None) -> OfflineStore:
    """The configured offline store; close it (or use it as a context manager) when done."""
    catalog = catalog or SchemaCatalog.load(settings.schemas_dir)
    if settings.offline_store.type == "clickhouse":
        from batch.offline_store.clickhouse import ClickHouseOfflineStore

        return ClickHouseOfflineStore(settings, catalog)
    from batch.offline_store.chdb import ChdbOfflineStore

    return ChdbOfflineStore(settings, catalog)
