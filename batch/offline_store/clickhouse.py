"""Server mode: the offline store on a ClickHouse server, through ``clickhouse-driver``.

Each topic gets a ``ReplacingMergeTree`` table ``<table>__lake`` ordered by
``(_topic, _partition, _offset)``: re-loading a rewritten lake file, or the rows a superseding
write kept, replaces rows instead of duplicating them. Queries read the view ``<table>``
(``SELECT * FROM <table>__lake FINAL``), so the SQL is the same as in the embedded store and
exact even before background merges, and each event once (later copies of an event id left
out, as in the embedded store). :meth:`refresh` loads the lake files that are new or changed
since the last load (recorded in ``_headwater_lake_files``); feature columns that appear in the
data beyond the schema (``<feature_set>:<feature>``) are added with ``ALTER TABLE``, and widened
when a file holds a wider type (a long feature that some file stored as doubles).

Needs ClickHouse >= 23 (Map, ASOF JOIN, window functions, ``FINAL`` on views' tables).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.offline_store.base import (
    OfflineStore,
    QueryError,
    first_copies_sql,
    render_params,
    table_name,
    topic_of_table,
)
from headwater.errors import ConfigError
from headwater.settings import Settings, redact_url
from processors.lake.columns import EventColumns, clickhouse_type, event_columns, unify_types
from processors.lake.writer import TopicLake
from streams.catalog import SchemaCatalog
from streams.topics import TOPICS

__all__ = ["ClickHouseOfflineStore", "arrow_to_clickhouse", "clickhouse_to_arrow"]

log = logging.getLogger(__name__)

_FILES_TABLE = "_headwater_lake_files"
_SCALAR_TO_ARROW: dict[str, pa.DataType] = {
    "String": pa.string(),
    "Bool": pa.bool_(),
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
    "Date": pa.date32(),
    "Date32": pa.date32(),
}


def _split_args(inner: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return parts


def clickhouse_to_arrow(type_: str) -> pa.DataType | None:
    """Arrow type of a ClickHouse type, or None when pyarrow should infer it."""
    m = re.fullmatch(r"(\w+)\((.*)\)", type_.strip())
    if m is None:
        return _SCALAR_TO_ARROW.get(type_.strip())
    outer, args = m[1], _split_args(m[2])
    if outer in {"Nullable", "LowCardinality"}:
        return clickhouse_to_arrow(args[0])
    if outer == "Array":
        item = clickhouse_to_arrow(args[0])
        return pa.list_(item) if item is not None else None
    if outer == "Map":
        key, value = clickhouse_to_arrow(args[0]), clickhouse_to_arrow(args[1])
        return pa.map_(key, value) if key is not None and value is not None else None
    if outer.startswith("DateTime"):
        return pa.timestamp("ms" if outer == "DateTime64" else "s", tz="UTC")
    return None


def arrow_to_clickhouse(t: pa.DataType) -> str:
    """A Nullable ClickHouse type for an extra (dynamic) Arrow column."""
    for ch, arrow in _SCALAR_TO_ARROW.items():
        if arrow == t and ch not in {"Date32"}:
            return f"Nullable({ch})"
    raise ConfigError(f"cannot add a column of Arrow type {t} to the offline store")


def _converter(t: pa.DataType) -> Any:
    """Turns one value of Arrow type ``t`` (as ``to_pylist`` gives it) into the driver's form."""
    if pa.types.is_map(t):
        key, item = _converter(t.key_type), _converter(t.item_type)
        return lambda v: None if v is None else {key(k): item(x) for k, x in v}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        item = _converter(t.value_type)
        return lambda v: None if v is None else [item(x) for x in v]
    if pa.types.is_struct(t):
        fields = [(f.name, _converter(f.type)) for f in t]
        return lambda v: None if v is None else tuple(conv(v.get(name)) for name, conv in fields)
    return lambda v: v


def _driver_columns(data: pa.Table) -> list[list[Any]]:
    columns = []
    for field in data.schema:
        conv = _converter(field.type)
        columns.append([conv(v) for v in data.column(field.name).to_pylist()])
    return columns


class ClickHouseOfflineStore(OfflineStore):
    """Topic tables on a ClickHouse server, loaded from the lake."""

    kind = "clickhouse"

    def __init__(self, settings: Settings, catalog: SchemaCatalog) -> None:
        url = settings.offline_store.clickhouse_url
        if not url:
            raise ConfigError(
                "offline_store.type is clickhouse but offline_store.clickhouse_url is not set: "
                "set HEADWATER_OFFLINE_STORE__CLICKHOUSE_URL=clickhouse://user:pass@host:9000/db"
            )
        try:
            from clickhouse_driver import Client
        except ImportError as exc:
            raise ConfigError(
                "server mode needs clickhouse-driver: pip install 'clickhouse-driver>=0.2.9'"
            ) from exc
        self.lake = settings.lake_dir.resolve()
        self._columns: dict[str, EventColumns] = {
            table_name(s.logical): event_columns(s.event_type, catalog.latest(s.event_type).raw)
            for s in TOPICS
        }
        self._client: Any = Client.from_url(url)
        try:
            self._client.execute("SELECT 1")
        except Exception as exc:
            raise ConfigError(f"cannot reach the ClickHouse server at {redact_url(url)}: {exc}") from exc
        self._create_tables()

    # -- SQL ----------------------------------------------------------------------------
    def _execute(self, sql: str, params: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        try:
            return self._client.execute(render_params(sql, params), **kw)
        except QueryError:
            raise
        except Exception as exc:  # the driver raises its own ServerException, NetworkError, ...
            raise QueryError(f"{exc}\n  in query: {' '.join(sql.split())[:200]}") from exc

    def _insert(self, sql: str, data: list[Any], columnar: bool = False) -> None:
        """``INSERT ... VALUES`` with rows (or columns) sent in the driver's native format."""
        try:
            self._client.execute(sql, data, columnar=columnar)
        except Exception as exc:
            raise QueryError(f"{exc}\n  in insert: {sql[:200]}") from exc

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        columns, types = self._execute(sql, params, columnar=True, with_column_types=True)
        arrays = {}
        for (name, type_), raw in zip(types, columns or [[] for _ in types], strict=True):
            arrow = clickhouse_to_arrow(type_)
            values = [_from_driver(v) for v in raw]
            arrays[name] = pa.array(values, type=arrow) if arrow is not None else pa.array(values)
        return pa.table(arrays) if arrays else pa.table({})

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._execute(sql, params)

    # -- tables -------------------------------------------------------------------------
    def _create_tables(self) -> None:
        self.execute(
            f"CREATE TABLE IF NOT EXISTS {_FILES_TABLE} (path String, mtime_ns Int64, size Int64) "
            "ENGINE = ReplacingMergeTree ORDER BY path"
        )
        for table, cols in self._columns.items():
            self.execute(
                f"CREATE TABLE IF NOT EXISTS `{table}__lake` ({cols.clickhouse_structure()}) "
                "ENGINE = ReplacingMergeTree(_ingest_time) ORDER BY (_topic, _partition, _offset)"
            )
            self._create_view(table)

    def _create_view(self, table: str) -> None:
        self.execute(f"CREATE OR REPLACE VIEW `{table}` AS SELECT * FROM {self.relation(table)}")

    def tables(self) -> list[str]:
        return sorted(self._columns)

    def relation(
        self, table: str, extra: Mapping[str, str] | None = None, *, deduplicated: bool = True
    ) -> str:
        topic_of_table(table)
        # The table itself rather than the view: columns added since the view was made count.
        rows = f"`{table}__lake` FINAL"
        id_field = self._columns[table].id_field
        if not deduplicated or id_field is None:
            return rows
        return first_copies_sql(rows, rows, id_field)

    def extra_columns(self, table: str) -> dict[str, str]:
        known = {c.name for c in self._columns[table].columns}
        rows = self._execute(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = {t:String}",
            {"t": f"{table}__lake"},
        )
        return {n: t for n, t in rows if n not in known}

    def refresh(self) -> None:
        """Load every lake file that is new or changed since it was last loaded."""
        loaded = {
            (p, m, s) for p, m, s in self._execute(f"SELECT path, mtime_ns, size FROM {_FILES_TABLE} FINAL")
        }
        for table in self._columns:
            lake = TopicLake(self.lake, topic_of_table(table).logical)
            for paths in lake.files().values():
                for path in paths:
                    st = path.stat()
                    if (str(path), st.st_mtime_ns, st.st_size) not in loaded:
                        self._load_file(table, path)
                        self._insert(
                            f"INSERT INTO {_FILES_TABLE} (path, mtime_ns, size) VALUES",
                            [(str(path), st.st_mtime_ns, st.st_size)],
                        )

    def _load_file(self, table: str, path: Path) -> None:
        data = pq.read_table(path)
        known = {c.name for c in self._columns[table].columns}
        # Lake columns of older releases (a feature update's values map and its JSON) stay out.
        data = data.select([n for n in data.column_names if n in known or ":" in n])
        existing = self.extra_columns(table)
        changed = False
        for field in data.schema:
            if field.name in known:
                continue
            have = clickhouse_to_arrow(existing[field.name]) if field.name in existing else None
            wanted = unify_types([field.type] if have is None else [have, field.type])
            alter = f"ALTER TABLE `{table}__lake`"
            if have is None:
                self.execute(f"{alter} ADD COLUMN IF NOT EXISTS `{field.name}` {clickhouse_type(wanted)}")
            elif wanted != have:
                self.execute(f"{alter} MODIFY COLUMN `{field.name}` {clickhouse_type(wanted)}")
            changed |= wanted != have
            if wanted != field.type:
                data = data.set_column(
                    data.schema.get_field_index(field.name),
                    field.with_type(wanted),
                    pc.cast(data[field.name], wanted),
                )
        if changed:
            self._create_view(table)
        names = data.column_names
        columns = _driver_columns(data)
        quoted = ", ".join(f"`{n}`" for n in names)
        self._insert(f"INSERT INTO `{table}__lake` ({quoted}) VALUES", columns, columnar=True)
        log.info("loaded %s into %s (%d rows)", path, table, data.num_rows)

    # -- staging ------------------------------------------------------------------------
    def stage(self, data: pa.Table, name: str) -> str:
        structure = ", ".join(f"`{f.name}` {_staged_type(f.type)}" for f in data.schema)
        self.execute(f"DROP TEMPORARY TABLE IF EXISTS `{name}`")
        self.execute(f"CREATE TEMPORARY TABLE `{name}` ({structure}) ENGINE = Memory")
        columns = _driver_columns(data)
        quoted = ", ".join(f"`{n}`" for n in data.column_names)
        self._insert(f"INSERT INTO `{name}` ({quoted}) VALUES", columns, columnar=True)
        return f"`{name}`"

    def unstage(self, name: str) -> None:
        self.execute(f"DROP TEMPORARY TABLE IF EXISTS `{name}`")

    def close(self) -> None:
        self._client.disconnect()


def _staged_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"Array({_staged_type(t.value_type)})"
    if pa.types.is_large_string(t):
        return "Nullable(String)"
    if pa.types.is_timestamp(t):
        return "Nullable(DateTime64(3, 'UTC'))"
    return arrow_to_clickhouse(t)


def _from_driver(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return list(value.items())
    return value
