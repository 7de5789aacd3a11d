"""The offline store interface: ClickHouse SQL over every topic's history.

Each topic is a table named like the topic with hyphens as underscores (``clicks``,
``feature_updates``, ``prediction_outcomes``), with the event's fields as columns (see
:mod:`processors.lake.columns`) plus ``_topic``, ``_partition``, ``_offset``, ``_key``,
``_event_type`` and ``_ingest_time``. The same SQL runs on both backends:

* ``chdb`` (embedded default): views over the Parquet lake, in the process's own engine;
* ``clickhouse``: MergeTree tables on a ClickHouse server, loaded from the lake.

Parameters use ClickHouse's ``{name:Type}`` placeholders on both.

Every table shows each event once: copies of an event (a processor's replay after a crash, a
client's retry), which share its id (``event_id``; ``prediction_id`` for predictions), are
read as the first written copy, the one with the smallest ``(_ingest_time, _partition,
_offset)`` (:func:`first_copies_sql`; the lake reader and training sets apply the same rule).
``relation(table, deduplicated=False)`` gives every archived row.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import pyarrow as pa

from headwater.errors import HeadwaterError, NotFoundError
from streams.topics import TOPICS, TopicSpec

__all__ = ["OfflineStore", "QueryError", "first_copies_sql", "render_params", "table_name", "topic_of_table"]


class QueryError(HeadwaterError):
    """ClickHouse rejected a query; the message is ClickHouse's, with the query's start."""


def table_name(topic: str) -> str:
    """SQL table of a logical topic: ``feature-updates`` -> ``feature_updates``."""
    return topic.replace("-", "_").replace(".", "_")


_BY_TABLE = {table_name(s.logical): s for s in TOPICS}


def topic_of_table(table: str) -> TopicSpec:
    spec = _BY_TABLE.get(table)
    if spec is None:
        raise NotFoundError(f"unknown offline-store table {table!r}; known: {', '.join(sorted(_BY_TABLE))}")
    return spec


def first_copies_sql(rows: str, ids: str, id_field: str) -> str:
    """A subquery of the rows of ``rows`` without the later copies of an event.

    ``ids`` is a (narrow) relation over the same rows with the id, ``_ingest_time``,
    ``_partition`` and ``_offset``. Ids seen more than once are found first (a count per id, no
    state per row), then only their copies are sorted: with no duplicate, the cost is one
    aggregation over the id column. Copies at the same lake position are one record (a rewrite
    caught mid-way), not later copies.
    """
    place = "(_ingest_time, _partition, _offset)"
    later = f"""
        SELECT later.1, later.2, later.3 FROM (
            SELECT arrayJoin(arrayPopFront(arraySort(arrayDistinct(groupArray({place}))))) AS later
            FROM {ids}
            WHERE `{id_field}` IN (SELECT `{id_field}` FROM {ids} GROUP BY `{id_field}` HAVING count() > 1)
            GROUP BY `{id_field}`)"""
    return f"(SELECT * FROM {rows} WHERE {place} NOT IN ({later}))"


class OfflineStore(ABC):
    """SQL over the history of every topic; one implementation per backend."""

    kind: str = ""
    lake: Path  # the Parquet lake the tables come from (training sets read it directly)

    @abstractmethod
    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a query and return its result as an Arrow table."""

    def query_df(self, sql: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        df: pd.DataFrame = self.query(sql, params).to_pandas()
        return df

    @abstractmethod
    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement without a result (DDL, INSERT ... SELECT)."""

    @abstractmethod
    def tables(self) -> list[str]:
        """Names of the topic tables."""

    @abstractmethod
    def extra_columns(self, table: str) -> dict[str, str]:
        """Columns present in the data beyond the schema's (``<feature_set>:<feature>``), with types."""

    @abstractmethod
    def relation(
        self, table: str, extra: Mapping[str, str] | None = None, *, deduplicated: bool = True
    ) -> str:
        """A SQL table expression for ``table`` that also exposes the ``extra`` columns.

        Each event once (see the module docstring), unless ``deduplicated=False``.
        """

    @abstractmethod
    def stage(self, data: pa.Table, name: str) -> str:
        """Upload ``data`` as a temporary table for this store's session; returns its SQL name."""

    @abstractmethod
    def unstage(self, name: str) -> None:
        """Drop a table made by :meth:`stage`."""

    def refresh(self) -> None:  # noqa: B027 - optional for backends that always see the lake
        """Make files the lake sink wrote since the last call visible (no-op where views do it)."""

    @abstractmethod
    def close(self) -> None: ...

    @contextmanager
    def staged(self, data: pa.Table, name: str) -> Iterator[str]:
        sql_name = self.stage(data, name)
        try:
            yield sql_name
        finally:
            self.unstage(name)

    def __enter__(self) -> OfflineStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- parameters rendered client-side (for drivers without server-side binding) ------------
_PLACEHOLDER = re.compile(r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):(?P<type>[^{}]+)\}")


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value)
            if math.isfinite(value)
            else ("nan" if math.isnan(value) else f"{'-' if value < 0 else ''}inf")
        )
    if isinstance(value, datetime | date):
        return _literal(value.isoformat(sep=" ") if isinstance(value, datetime) else value.isoformat())
    if isinstance(value, str | bytes):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple | set | frozenset):
        inner = ", ".join(_literal(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, Mapping):
        return "map(" + ", ".join(f"{_literal(k)}, {_literal(v)}" for k, v in value.items()) + ")"
    raise QueryError(f"cannot pass a {type(value).__name__} as a query parameter")


def render_params(sql: str, params: Mapping[str, Any] | None) -> str:
    """Replace ``{name:Type}`` placeholders by typed literals (``Identifier`` by a quoted name)."""
    if not params:
        return sql

    def sub(m: re.Match[str]) -> str:
        name, type_ = m["name"], m["type"].strip()
        if name not in params:
            raise QueryError(f"query parameter {name!r} has no value; pass params={{{name!r}: ...}}")
        value = params[name]
        if type_ == "Identifier":
            return "`" + str(value).replace("`", "\\`") + "`"
        return f"CAST({_literal(value)}, '{type_}')"

    return _PLACEHOLDER.sub(sub, sql)
