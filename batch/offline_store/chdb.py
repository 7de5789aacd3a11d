"""The embedded offline store: ClickHouse in-process (chdb) with views over the Parquet lake.

A chdb data directory is locked by the process that opens it, so nothing is stored in
chdb itself: each process opens its own engine (chdb's ``:memory:`` mode, which keeps its
catalog in a temporary directory of its own under ``/tmp`` and removes it on close) and
creates, in a database of its own, one view per topic::

    CREATE VIEW clicks AS SELECT * FROM file('<lake>/clicks/*/*.parquet', Parquet, '<columns>')

Views are made on first use: before a statement that names the table (any statement naming
``tables``, as ``SHOW TABLES``, gets them all). Each costs ~2 ms, and most uses name one or
two of the eleven (``materialize`` none: it reads ``relation()``). Each view shows every
event once (:func:`batch.offline_store.base.first_copies_sql`).

The glob is expanded at every query, so a view sees the files the lake sink wrote after it
was created, and the explicit columns (from the Avro schema) make a topic without files an
empty table with the right columns. Files being written have temporary names that the glob
does not match, so any number of processes query while the sink writes. ``feature_updates``
also has a column per ``<feature_set>:<feature>`` in the lake, typed as every file can be read
(from the files' footers, cached): its view is made again when a statement names it after new
feature columns appeared.

Only one chdb engine can exist per process: every chdb use in a Headwater process goes
through :class:`ChdbOfflineStore` (stores share the engine, each has its own session and
database). chdb starts the engine with the first session and stops it with the last (~25 ms
each way), so the first store also opens a session that stays until the process exits:
later stores (a backfill, then a materialize; a test run's hundreds) find the engine running.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyarrow import feather

from batch.offline_store.base import OfflineStore, QueryError, first_copies_sql, table_name, topic_of_table
from headwater.errors import ConfigError
from headwater.settings import Settings
from processors.lake.columns import EventColumns, clickhouse_type, event_columns
from processors.lake.integrity import LakeWatch
from processors.lake.reader import feature_column_types
from streams.catalog import SchemaCatalog
from streams.topics import TOPICS

__all__ = ["ChdbOfflineStore"]

log = logging.getLogger(__name__)

# Settings of every session: files of older schema versions lack newer columns; the
# row-count cache is keyed by path and modification time, so rewritten files stay exact.
_SESSION_SETTINGS = {
    "input_format_parquet_allow_missing_columns": 1,
    "schema_inference_mode": "'union'",
    # Results stay in this process: compressing them only costs time (a quarter of a wide read).
    "output_format_arrow_compression_method": "'none'",
}
_GLOB_CHARS = set("*?{}[]")
_counter = itertools.count()
_ALL_VIEWS = re.compile(r"\btables\b", re.IGNORECASE)  # SHOW TABLES, system.tables: list them all
_FEATURE_TABLE = "feature_updates"  # the one table with columns beyond its schema's

# The session that keeps this process's engine running (see the module's docstring), by pid:
# a forked child must not close its parent's.
_engine: dict[int, Any] = {}
_engine_lock = threading.Lock()


def _keep_engine(session_type: Any) -> None:
    with _engine_lock:
        if os.getpid() not in _engine:
            _engine[os.getpid()] = keeper = session_type(":memory:")
            atexit.register(_stop_engine, os.getpid(), keeper)  # removes its /tmp catalog


def _stop_engine(pid: int, keeper: Any) -> None:
    if os.getpid() == pid:
        keeper.close()


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ChdbOfflineStore(OfflineStore):
    """Views over the lake in this process's chdb engine."""

    kind = "chdb"

    def __init__(self, settings: Settings, catalog: SchemaCatalog) -> None:
        try:
            from chdb.session import Session
        except ImportError as exc:  # pragma: no cover - chdb is a core dependency
            raise ConfigError("the embedded offline store needs chdb: pip install 'chdb>=3'") from exc
        self.lake = settings.lake_dir.resolve()
        if _GLOB_CHARS & set(str(self.lake)):
            raise ConfigError(f"lake_dir {self.lake} contains glob characters {_GLOB_CHARS}: choose another")
        self._columns: dict[str, EventColumns] = {
            table_name(s.logical): event_columns(s.event_type, catalog.latest(s.event_type).raw)
            for s in TOPICS
        }
        self.database = f"headwater_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
        self._stage_dir = Path(tempfile.mkdtemp(prefix="headwater-stage-"))
        _keep_engine(Session)
        self._session: Any = Session(":memory:")  # type: ignore[no-untyped-call]
        self._closed = False
        self._names = {table: re.compile(rf"\b{table}\b") for table in self._columns}
        self._views: dict[str, tuple[tuple[str, str], ...]] = {}  # made views -> their extra columns
        self._watch = LakeWatch(self.lake)  # warns when a query's files change under it
        self._views_lock = threading.Lock()  # sessions are thread-safe; so is making views
        setup = [f"CREATE DATABASE IF NOT EXISTS {self.database}", f"USE {self.database}"]
        setup += [f"SET {name} = {value}" for name, value in _SESSION_SETTINGS.items()]
        self._run(";\n".join(setup), "CSV", None)  # one call: each costs ~1 ms of its own

    def _make_views(self, sql: str) -> None:
        """Create the views ``sql`` names (all, if it names ``tables``), again if their columns grew."""
        every = _ALL_VIEWS.search(sql) is not None
        named = [t for t, name in self._names.items() if every or name.search(sql)]
        if not named:
            return
        with self._views_lock:
            wanted = {t: tuple(self.extra_columns(t).items()) if t == _FEATURE_TABLE else () for t in named}
            stale = [t for t in named if self._views.get(t) != wanted[t]]
            if stale:
                views = (
                    f"CREATE OR REPLACE VIEW `{t}` AS SELECT * FROM {self.relation(t, dict(wanted[t]))}"
                    for t in stale
                )
                self._run(";\n".join(views), "CSV", None)
                self._views.update((t, wanted[t]) for t in stale)

    # -- SQL ----------------------------------------------------------------------------
    def _run(self, sql: str, fmt: str, params: Mapping[str, Any] | None) -> Any:
        if self._closed:
            raise QueryError("the offline store is closed")
        try:
            return self._session.query(sql, fmt, params=dict(params) if params else None)
        except Exception as exc:  # chdb raises RuntimeError/ChdbError with ClickHouse's message
            head = " ".join(sql.split())[:200]
            raise QueryError(f"{exc}\n  in query: {head}") from exc

    def _topics(self, sql: str) -> list[str]:
        """The topics whose files ``sql`` reads: through a view, or a relation() it embeds."""
        return [
            topic_of_table(t).logical
            for t, name in self._names.items()
            if name.search(sql) or f"{self.lake}/{topic_of_table(t).logical}/" in sql
        ]

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        self._make_views(sql)
        with self._watch.reading(self._topics(sql)):
            result = self._run(sql, "Arrow", params)
        if result is None or not result.size():
            return pa.table({})  # statements without a result
        # Zero copy, and safe: chdb reuses a result's memory once the result object is gone, so
        # the Arrow buffers hold it (chdb's own "ArrowTable" does not: uncompressed, its tables
        # would read freed memory after the next query).
        view = result.get_memview().view()
        data = pa.foreign_buffer(pa.py_buffer(view).address, len(view), base=result)
        return pa.ipc.open_file(data).read_all()

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._make_views(sql)
        with self._watch.reading(self._topics(sql)):
            self._run(sql, "CSV", params)

    # -- tables -------------------------------------------------------------------------
    def tables(self) -> list[str]:
        return sorted(self._columns)

    def glob(self, table: str) -> str:
        return str(self.lake / topic_of_table(table).logical / "*" / "*.parquet")

    def relation(
        self, table: str, extra: Mapping[str, str] | None = None, *, deduplicated: bool = True
    ) -> str:
        cols = self._columns.get(table)
        if cols is None:
            topic_of_table(table)  # raises NotFoundError listing the tables
            raise AssertionError(table)
        structure = cols.clickhouse_structure()
        if extra:
            structure += ", " + ", ".join(f"`{name}` {type_}" for name, type_ in extra.items())
        glob = _quote(self.glob(table))
        rows = f"file({glob}, Parquet, {_quote(structure)})"
        if not deduplicated or cols.id_field is None:
            return rows
        narrow = f"`{cols.id_field}` String, _ingest_time Int64, _partition Int32, _offset Int64"
        return first_copies_sql(rows, f"file({glob}, Parquet, {_quote(narrow)})", cols.id_field)

    def extra_columns(self, table: str) -> dict[str, str]:
        topic_of_table(table)
        if table != _FEATURE_TABLE:
            return {}
        # Always Nullable: a file written before a feature existed must read NULL, not 0.
        return {name: clickhouse_type(t) for name, t in feature_column_types(self.lake).items()}

    # -- staging ------------------------------------------------------------------------
    def stage(self, data: pa.Table, name: str) -> str:
        path = self._stage_dir / f"{name}.arrow"
        feather.write_feather(data, str(path), compression="uncompressed")
        self.execute(f"DROP TABLE IF EXISTS `{name}`")
        self.execute(
            f"CREATE TABLE `{name}` ENGINE = Memory AS SELECT * FROM file({_quote(str(path))}, Arrow)"
        )
        path.unlink()
        return f"`{name}`"

    def unstage(self, name: str) -> None:
        self.execute(f"DROP TABLE IF EXISTS `{name}`")

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._run(f"DROP DATABASE IF EXISTS {self.database}", "CSV", None)
        finally:
            self._closed = True
            self._session.close()
            shutil.rmtree(self._stage_dir, ignore_errors=True)
