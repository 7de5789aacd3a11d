"""Backfill: a feature set's values over a past time range, from raw events, into both stores.

    result = backfill(settings, "user_activity", start_ms, end_ms)

1. **Compute.** The feature set compiled to ClickHouse SQL (:func:`features.sql.backfill_sql`)
   runs in the offline store over the source topic's table (raw events), giving its values at
   every source event time in ``[start, end)``; events up to the largest window before
   ``start`` count as history. The result is kept in a temporary table of the store's
   session, and ClickHouse also picks each entity's latest row for the online store.
2. **Lake.** Every row becomes a feature update (``source = BACKFILL``, ``write_time`` = now,
   a deterministic ``event_id``) in the ``feature-updates`` topic's folder, so the
   ``feature_updates`` table, point-in-time training sets and the server mode see backfilled
   and streamed values side by side (layout below).
3. **Online.** The latest row per entity goes to the online store with the feature set's TTL
   through :meth:`OnlineStore.put_columns`: newer-wins on event time, so a backfill never
   overwrites a newer value the stream wrote; on equal event times the later write wins, as
   for the stream. Nothing goes row by row through Python: ClickHouse hands Arrow columns to
   the lake writer and to the online store's vectorised encoder.

Backfilled rows in the lake
---------------------------
They live beside the sink's files, named the sink's way (:mod:`processors.lake.layout`), in
a partition space of their own::

    <lake>/feature-updates/date=YYYY-MM-DD/feature-updates+<P>+<first>-<last>.parquet

* ``P = 2**23 + <days since 1970-01-01>`` of the folder's date (:data:`PARTITION_BASE`): one
  partition per day, far above any Kafka partition, so the sink's per-partition supersede
  rule never touches these files and ``(_partition, _offset)`` -- the lake row id of
  historical retrieval -- never collides with a streamed row;
* one file per (feature set, version, day), whose offsets are ``slot * 2**28 + rank``: the
  feature set's *slot* in that day's partition (its existing file's, else the lowest free one;
  at most 4,096 per day), then the row's rank by (event time, entity key). A partition stays
  below 2**24 and an offset below 2**40, as the row id needs. Each file records its feature
  set, version and slot in its Parquet metadata (:data:`METADATA_KEY`).

Re-running replaces, never duplicates: a backfill of ``[start, end)`` rewrites the file of
every day it touches with that file's rows outside the range kept and the rows inside
replaced (a day with nothing left loses its file). The new file is renamed into place, then
an old one of another name is deleted -- for that instant a reader may count the day twice,
as after a sink crash. Lake writes of concurrent backfills are serialised by a lock file.
Because the names parse as lake files, the server mode loads them (a rewrite with fewer rows
leaves the vanished offsets in its ReplacingMergeTree) and the broker-restore step of
``headwater up`` reads them with the sink's rows: for a key in both, restore must keep the
newer event time, since a backfill is ingested after the streamed rows it may be older than.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.offline_store import OfflineStore, open_offline_store, table_name
from features.definitions import FeatureSet
from features.predicates import sql_identifier, sql_literal
from features.repository import FeatureRepository
from features.sql import backfill_sql, own_columns, tiles_sql
from features.tiles import backfill_tiles
from headwater.errors import ConfigError, HeadwaterError
from headwater.settings import Settings
from processors.lake.columns import VALUE_EXCEPTIONS, VALUE_KEYS, event_columns, feature_column
from processors.lake.layout import DATE_PREFIX, FileName, date_of
from processors.lake.manifest import remove_lake_file
from processors.lake.writer import write_parquet
from serving.online_store import open_online_store
from streams.catalog import SchemaCatalog

__all__ = ["METADATA_KEY", "PARTITION_BASE", "BackfillResult", "backfill", "partition_of_day"]

log = logging.getLogger(__name__)

TOPIC = "feature-updates"
DAY_MS = 86_400_000
PARTITION_BASE = 1 << 23
SLOT_SHIFT = 28  # offset = slot << 28 | rank
MAX_SLOTS = 1 << (40 - SLOT_SHIFT)
MAX_ROWS_PER_FILE = 1 << SLOT_SHIFT
METADATA_KEY = b"headwater.backfill"
LOCK_FILE = ".backfill.lock"
_EPOCH_DAY = date(1970, 1, 1)


@dataclass
class BackfillResult:
    """What a backfill did; times in seconds."""

    feature_set: str
    version: int
    start_ms: int
    end_ms: int
    write_time_ms: int = 0  # the write time of every update written
    updates: int = 0  # rows computed: one per (entity, source event time) in the range
    entities: int = 0
    lake_files: list[Path] = field(default_factory=list)
    online_written: int = 0  # entities whose online value was replaced (newer-wins)
    online_expired: int = 0  # of the entities sent, those already past the TTL at write time
    sql_s: float = 0.0  # ClickHouse: values at every event time, and each entity's latest
    lake_s: float = 0.0  # lake rows formatted by ClickHouse, and the Parquet files written
    online_s: float = 0.0  # the online-store write
    total_s: float = 0.0


def partition_of_day(day: int) -> int:
    """The lake partition of backfilled rows whose event time falls on UTC day ``day`` (days since 1970)."""
    return PARTITION_BASE + day


def backfill(
    settings: Settings,
    feature_set_name: str,
    start_ms: int,
    end_ms: int,
    *,
    online: bool = True,
    repository: FeatureRepository | None = None,
) -> BackfillResult:
    """Compute ``feature_set_name`` over ``[start_ms, end_ms)`` from raw events; write lake and online store.

    ``repository`` defaults to the settings' feature repository. Raises
    :class:`~headwater.errors.NotFoundError` for an unknown feature set (listing the known ones)
    and :class:`~headwater.errors.ConfigError` for a bad range.
    """
    started = time.perf_counter()
    if repository is None:
        from processors.worker import load_repository  # the CLI's and workers' loader

        repository = load_repository(settings)
    fs = repository.feature_set(feature_set_name)
    if not (isinstance(start_ms, int) and isinstance(end_ms, int)) or start_ms < 0:
        raise ConfigError(f"backfill range must be epoch ms >= 0, got {start_ms!r} .. {end_ms!r}")
    if end_ms <= start_ms:
        raise ConfigError(f"backfill range is empty: end {end_ms} is not after start {start_ms}")
    write_time = time.time_ns() // 1_000_000
    result = BackfillResult(fs.name, fs.version, start_ms, end_ms, write_time)
    catalog = SchemaCatalog.load(settings.schemas_dir)
    with open_offline_store(settings, catalog) as store:
        store.refresh()
        tmp = f"_hw_backfill_{uuid.uuid4().hex[:10]}"
        try:
            t = time.perf_counter()
            relation = store.relation(table_name(fs.source))
            store.execute(
                f"CREATE TEMPORARY TABLE {tmp} ENGINE = Memory AS "
                + backfill_sql(fs, relation, start_ms, end_ms, order=False, own=True)
            )
            tiles = _tiles(store, fs, tmp, relation, start=start_ms, end=end_ms)
            latest = _with_tiles(_latest(store, fs, tmp), tiles, "_valid_until", "_tiles") if online else None
            result.sql_s = time.perf_counter() - t

            t = time.perf_counter()
            rows = _with_tiles(store.query(_lake_sql(fs, tmp, write_time)), tiles, "valid_until", "tiles")
            result.updates = rows.num_rows
            result.entities = len(pc.unique(rows.column("entity_key")))
            schema = _lake_schema(fs, catalog)
            result.lake_files = _write_lake(
                settings.lake_dir, fs, schema, rows, start_ms=start_ms, end_ms=end_ms
            )
            result.lake_s = time.perf_counter() - t
        finally:
            store.execute(f"DROP TEMPORARY TABLE IF EXISTS {tmp}")
    if latest is not None and latest.num_rows:
        t = time.perf_counter()
        with open_online_store(settings) as online_store:
            result.online_written = online_store.put_columns(
                fs.name, latest, ttl_s=fs.ttl_ms / 1000, write_time_ms=write_time
            )
        result.online_s = time.perf_counter() - t
        times = latest.column("event_time")
        result.online_expired = pc.sum(pc.less_equal(times, write_time - fs.ttl_ms)).as_py() or 0
    result.total_s = time.perf_counter() - started
    log.info(
        "backfill %s v%d [%d, %d): %d updates of %d entities, %d lake files, %d online writes "
        "(sql %.2fs, lake %.2fs, online %.2fs)",
        fs.name, fs.version, start_ms, end_ms, result.updates, result.entities, len(result.lake_files),
        result.online_written, result.sql_s, result.lake_s, result.online_s,
    )  # fmt: skip
    return result


# --- ClickHouse: the online rows and the lake rows ---------------------------------------------


Tiles = dict[tuple[str, int], tuple[int, bytes]]  # (entity, event time) -> (valid_until, tiles)


def _tiles(store: OfflineStore, fs: FeatureSet, tmp: str, relation: str, *, start: int, end: int) -> Tiles:
    """Every computed row's window tiles (:mod:`features.tiles`): what the stream's update at the
    same time carries, so backfilled values are read at the read's time as streamed ones are."""
    own = [c for window in own_columns(fs) for measure in window for c in measure]
    rows = store.query(f"SELECT entity_key, event_time, {', '.join(own)} FROM {tmp}")
    windows = len({f.window_ms for f in fs.features})
    tiles = [store.query(tiles_sql(fs, relation, start, end, w)) for w in range(windows)]
    blobs, valid = backfill_tiles(fs, rows, tiles)
    keys = zip(rows.column("entity_key").to_pylist(), rows.column("event_time").to_pylist(), strict=True)
    return {key: (until, blob) for key, until, blob in zip(keys, valid, blobs, strict=True)}


def _with_tiles(table: pa.Table, tiles: Tiles, until_column: str, tiles_column: str) -> pa.Table:
    """``table`` (rows of entity_key, event_time, ...) with each row's valid_until and tiles, placed
    after ``source`` when it has one (the lake's column order), else at the end."""
    keys = zip(table.column("entity_key").to_pylist(), table.column("event_time").to_pylist(), strict=True)
    found = [tiles[(k, int(t))] for k, t in keys]
    at = table.schema.get_field_index("source") + 1 if "source" in table.column_names else table.num_columns
    table = table.add_column(at, until_column, pa.array([u for u, _ in found], pa.int64()))
    return table.add_column(at + 1, tiles_column, pa.array([b for _, b in found], pa.binary()))


def _latest(store: OfflineStore, fs: FeatureSet, tmp: str) -> pa.Table:
    """Each entity's values at its latest event time in the range: what the online store gets."""
    columns = ", ".join(sql_identifier(f.name) for f in fs.features)
    return store.query(
        f"SELECT entity_key, event_time, {columns} FROM {tmp} "
        "ORDER BY entity_key, event_time DESC LIMIT 1 BY entity_key"
    )


_ARROW_OF = {"long": pa.int64(), "double": pa.float64(), "boolean": pa.bool_(), "string": pa.string()}
_SQL_OF = {"long": "toInt64", "double": "toFloat64", "boolean": "toBool", "string": "toString"}


def _lake_sql(fs: FeatureSet, tmp: str, write_time: int) -> str:
    """The lake columns of feature updates (:mod:`processors.lake.columns`) for every computed row.

    Every feature is a key of the update's values (null where it has no value), as the stream
    writes them, and its typed column has the feature's declared type. ``_partition`` and
    ``_offset`` are placeholders: :func:`_write_lake` numbers the rows per file.
    """
    name, version = sql_literal(fs.name), int(fs.version)
    keys = json.dumps([f.name for f in fs.features], separators=(",", ":"))
    typed = ", ".join(
        f"{_SQL_OF[f.dtype]}({sql_identifier(f.name)}) AS {sql_identifier(feature_column(fs.name, f.name))}"
        for f in fs.features
    )
    return f"""
        SELECT
            lower(hex(sipHash128({name}, {version}, entity_key, event_time, 'BACKFILL'))) AS event_id,
            {name} AS feature_set,
            toInt32({version}) AS feature_set_version,
            entity_key,
            toInt64(event_time) AS event_time,
            toInt64({write_time}) AS write_time,
            {sql_literal(keys)} AS {VALUE_KEYS},
            CAST(map(), 'Map(String, String)') AS {VALUE_EXCEPTIONS},
            'BACKFILL' AS source,
            {sql_literal(TOPIC)} AS _topic,
            toInt32(0) AS _partition,
            toInt64(0) AS _offset,
            concat({name}, '|', entity_key) AS _key,
            'feature_update' AS _event_type,
            toInt64({write_time}) AS _ingest_time,
            {typed}
        FROM {tmp}
        ORDER BY event_time, entity_key
    """


def _lake_schema(fs: FeatureSet, catalog: SchemaCatalog) -> pa.Schema:
    """The feature-update columns, then one column per ``<feature set>:<feature>`` of its declared type."""
    base = event_columns("feature_update", catalog.latest("feature_update").raw).arrow_schema()
    typed = [
        pa.field(feature_column(fs.name, f.name), _ARROW_OF[f.dtype], nullable=True) for f in fs.features
    ]
    return pa.schema([*base, *typed])


def _in_schema(table: pa.Table, fs: FeatureSet, schema: pa.Schema) -> pa.Table:
    """A backfill file's rows in ``schema``. Files of releases that kept the values as a map and
    as JSON (and every number as a double) get the key list and typed columns of today's."""
    if VALUE_KEYS not in table.column_names:
        n = table.num_rows
        keys = json.dumps([f.name for f in fs.features], separators=(",", ":"))
        table = table.append_column(VALUE_KEYS, pa.array([keys] * n, pa.string()))
        empty = pa.MapArray.from_arrays(
            pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()), pa.array([], pa.string())
        )
        table = table.append_column(VALUE_EXCEPTIONS, empty)
    return table.select(schema.names).cast(schema)


# --- the lake files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _DayFile:
    """An existing backfill file of one day's partition."""

    path: Path
    feature_set: str
    version: int
    slot: int


def _day_files(folder: Path, partition: int) -> list[_DayFile]:
    found: list[_DayFile] = []
    if not folder.is_dir():
        return found
    for entry in os.scandir(folder):
        name = FileName.parse(entry.name)
        if name is None or name.topic != TOPIC or name.partition != partition:
            continue
        meta = json.loads((pq.read_schema(entry.path).metadata or {}).get(METADATA_KEY, b"{}"))
        if {"feature_set", "version", "slot"} <= meta.keys():
            found.append(_DayFile(Path(entry.path), meta["feature_set"], meta["version"], meta["slot"]))
    return found


@contextmanager
def _lake_lock(lake: Path) -> Iterator[None]:
    lake.mkdir(parents=True, exist_ok=True)
    with open(lake / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_lake(
    lake: Path, fs: FeatureSet, schema: pa.Schema, rows: pa.Table, *, start_ms: int, end_ms: int
) -> list[Path]:
    """Rewrite the (feature set, version, day) file of every day ``[start, end)`` touches (module doc)."""
    rows = rows.cast(schema)
    times = rows.column("event_time").to_numpy()
    days = times // DAY_MS
    bounds = np.flatnonzero(np.diff(days)) + 1  # rows are ordered by event time
    new_by_day = {
        int(days[a]): rows.slice(a, b - a)
        for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(days)], strict=True)
        if b > a
    }
    written: list[Path] = []
    with _lake_lock(lake):
        # Days with new rows, and days in the range whose folders may hold rows to replace.
        touched = set(new_by_day) | {
            d for d in _folder_days(lake / TOPIC) if start_ms // DAY_MS <= d < -(-end_ms // DAY_MS)
        }
        for day in sorted(touched):
            folder = lake / TOPIC / f"{DATE_PREFIX}{date_of(day * DAY_MS)}"
            path = _rewrite_day(
                folder,
                partition_of_day(day),
                fs,
                schema=schema,
                new=new_by_day.get(day),
                start_ms=start_ms,
                end_ms=end_ms,
            )
            if path is not None:
                written.append(path)
    return written


def _folder_days(topic_dir: Path) -> list[int]:
    """Days (since 1970) of the topic's ``date=YYYY-MM-DD`` folders."""
    if not topic_dir.is_dir():
        return []
    days = []
    for entry in os.scandir(topic_dir):
        if entry.is_dir() and entry.name.startswith(DATE_PREFIX):
            with contextlib.suppress(ValueError):
                day = date.fromisoformat(entry.name[len(DATE_PREFIX) :])
                days.append((day - _EPOCH_DAY).days)
    return days


def _rewrite_day(
    folder: Path,
    partition: int,
    fs: FeatureSet,
    *,
    schema: pa.Schema,
    new: pa.Table | None,
    start_ms: int,
    end_ms: int,
) -> Path | None:
    existing = _day_files(folder, partition)
    mine = [f for f in existing if (f.feature_set, f.version) == (fs.name, fs.version)]
    if mine:
        slot = mine[0].slot
    else:
        taken = {f.slot for f in existing}
        slot = next((s for s in range(MAX_SLOTS) if s not in taken), -1)
        if slot < 0:
            raise HeadwaterError(
                f"{folder}: {MAX_SLOTS} feature set versions are already backfilled for this day; "
                "no lake partition slot is left for another"
            )
    parts = [new] if new is not None else []
    for f in mine:
        old = _in_schema(pq.read_table(f.path).replace_schema_metadata(None), fs, schema)
        t = old.column("event_time")
        parts.append(old.filter(pc.or_(pc.less(t, start_ms), pc.greater_equal(t, end_ms))))
    parts = [p for p in parts if p.num_rows]
    path: Path | None = None
    if parts:
        table = parts[0]  # new rows, and each file's rows, are ordered by (event time, entity key)
        if len(parts) > 1:
            table = pa.concat_tables(parts).sort_by(
                [("event_time", "ascending"), ("entity_key", "ascending")]
            )
        n = table.num_rows
        if n > MAX_ROWS_PER_FILE:
            raise HeadwaterError(
                f"{fs.name}: {n} backfilled updates on {folder.name}; one day holds at most "
                f"{MAX_ROWS_PER_FILE} per feature set"
            )
        first = slot << SLOT_SHIFT
        table = table.set_column(
            table.schema.get_field_index("_partition"),
            "_partition",
            pa.array(np.full(n, partition, np.int32)),
        )
        table = table.set_column(
            table.schema.get_field_index("_offset"),
            "_offset",
            pa.array(np.arange(first, first + n, dtype=np.int64)),
        )
        meta = {"feature_set": fs.name, "version": fs.version, "slot": slot}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
        path = write_parquet(folder, FileName(partition, first, first + n - 1, TOPIC), table)
    for f in mine:
        if f.path != path:
            remove_lake_file(f.path)
            log.info("replaced backfill file %s", f.path)
    return path
