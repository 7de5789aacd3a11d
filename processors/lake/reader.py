"""Reading a topic back from the lake: whole tables, Avro-shaped records, latest per key.

The broker-restore step of ``headwater up`` replays the compacted topics (``models``,
``experiments``, ``bandit-state``, ``feature-updates``) into an empty broker with
:meth:`LakeReader.latest_records`: for each Kafka key, the record at the highest lake offset,
which is what log compaction would have kept.

**Each event once.** A processor that crashes after producing and before committing produces
its outputs again when it restarts, and a client that retries publishes its event again: the
lake then holds two copies of one event, at two offsets, with the same id (``event_id``;
``prediction_id`` for predictions). Records are read back deduplicated: of the copies of an
id, the first written (smallest ``(_ingest_time, _partition, _offset)``) is kept, so a replay
sees each event once. :func:`first_copies` is that rule, for the offline store's training
sets too; its views apply the same rule in SQL.

Records are decoded file by file, each with its own column types (see
:mod:`processors.lake.columns`), so every value comes back as the Avro type it was written as.
"""

from __future__ import annotations

import heapq
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from headwater.settings import Settings
from processors.lake.columns import META_COLUMNS, EventColumns, event_columns, unify_types
from processors.lake.writer import TopicLake, topic_spec
from streams.catalog import SchemaCatalog

__all__ = [
    "LakeReader",
    "LakeRecord",
    "feature_column_types",
    "file_schema",
    "first_copies",
    "lake_files",
    "open_file",
]

FEATURE_TOPIC = "feature-updates"
_FIXED = {c.name for c in META_COLUMNS}


@dataclass(frozen=True)
class LakeRecord:
    """One archived record: its place in the lake, its Kafka key and the decoded event."""

    topic: str
    partition: int
    offset: int  # lake offset
    key: str | None
    event_type: str
    record: dict[str, Any]
    ingest_time: int


def lake_files(root: Path, topic: str) -> list[Path]:
    """Every complete file of a (logical) topic, ordered by partition, offsets and date folder."""
    return [path for _name, paths in sorted(TopicLake(root, topic).files().items()) for path in sorted(paths)]


# A footer is read once per file version: a lake of thousands of files is described in
# milliseconds after the first time, and reads given the parsed footer skip parsing it again.
# Files are replaced, never modified in place, so (mtime, size) tells a new version.
_footers: dict[str, tuple[int, int, pq.FileMetaData, pa.Schema]] = {}
_footers_lock = threading.Lock()


def _footer(path: Path) -> tuple[pq.FileMetaData, pa.Schema]:
    st = os.stat(path)
    key = str(path)
    with _footers_lock:
        cached = _footers.get(key)
    if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2], cached[3]
    metadata = pq.read_metadata(path)
    schema = metadata.schema.to_arrow_schema()
    with _footers_lock:
        _footers[key] = (st.st_mtime_ns, st.st_size, metadata, schema)
    return metadata, schema


def file_schema(path: Path) -> pa.Schema:
    """The Arrow schema of a lake file, from its footer (cached while the file is unchanged)."""
    return _footer(path)[1]


def open_file(path: Path, **options: Any) -> pq.ParquetFile:
    """A lake file to read, memory-mapped, with its footer parsed once (see :func:`file_schema`)."""
    return pq.ParquetFile(path, metadata=_footer(path)[0], memory_map=True, **options)


def feature_column_types(root: Path, paths: Iterable[Path] | None = None) -> dict[str, pa.DataType]:
    """Each ``<feature_set>:<feature>`` column of the feature-updates files, with the type readers
    give it (:func:`processors.lake.columns.unify_types` of its types in the files)."""
    seen: dict[str, set[pa.DataType]] = {}
    for path in lake_files(root, FEATURE_TOPIC) if paths is None else paths:
        for field in file_schema(path):
            if ":" in field.name and field.name not in _FIXED:
                seen.setdefault(field.name, set()).add(field.type)
    return {name: unify_types(types) for name, types in sorted(seen.items())}


def first_copies(
    ids: pa.Array | pa.ChunkedArray, ingest: np.ndarray, partition: np.ndarray, offset: np.ndarray
) -> np.ndarray:
    """Which rows to keep: for each id, its first written copy (smallest ingest time, partition,
    offset). A boolean mask; rows without an id are all kept."""
    keep = np.ones(len(ingest), dtype=bool)
    if len(ingest) < 2:
        return keep
    encoded = pc.dictionary_encode(ids)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    known = codes >= 0
    counts = np.bincount(codes[known], minlength=len(encoded.dictionary))
    repeated = np.flatnonzero(known & (counts[np.maximum(codes, 0)] > 1))
    if len(repeated) == 0:
        return keep
    order = repeated[np.lexsort((offset[repeated], partition[repeated], ingest[repeated], codes[repeated]))]
    later = np.ones(len(order), dtype=bool)
    later[0] = False
    later[1:] = codes[order[1:]] == codes[order[:-1]]
    keep[order[later]] = False
    return keep


class LakeReader:
    """Reads topics from the lake directory of ``settings``."""

    def __init__(self, settings: Settings, catalog: SchemaCatalog) -> None:
        self.root = settings.lake_dir
        self.prefix = settings.topic_prefix
        self.catalog = catalog

    def _columns(self, topic: str) -> EventColumns:
        spec = topic_spec(topic, self.prefix)
        return event_columns(spec.event_type, self.catalog.latest(spec.event_type).raw)

    def read_topic(self, topic: str) -> pa.Table:
        """Every row of a topic, ordered by partition and offset; empty (with columns) if none.

        For inspection: a feature typed differently in two files comes back in the wider type
        (:meth:`iter_records` gives the exact records), and copies of an event are all there.
        """
        spec = topic_spec(topic, self.prefix)
        tables = [pq.read_table(path) for path in lake_files(self.root, spec.logical)]
        if not tables:
            return self._columns(topic).arrow_schema().empty_table()
        # Files written by older schema versions miss later columns: promote fills nulls.
        table = pa.concat_tables(tables, promote_options="permissive")
        return table.sort_by([("_partition", "ascending"), ("_offset", "ascending")])

    def iter_records(self, topic: str, batch_rows: int = 10_000) -> Iterator[LakeRecord]:
        """Records of a topic in (partition, offset) order, in the topic's latest Avro shape,
        each event once (its first written copy)."""
        spec = topic_spec(topic, self.prefix)
        cols = self._columns(topic)
        tables = [pq.read_table(path).sort_by("_offset") for path in lake_files(self.root, spec.logical)]
        if cols.id_field is not None and tables:
            keep = first_copies(
                pa.chunked_array([c for t in tables for c in _column(t, cols.id_field).chunks], pa.string()),
                *(
                    np.concatenate([_ints(t, c) for t in tables])
                    for c in ("_ingest_time", "_partition", "_offset")
                ),
            )
            bounds = np.cumsum([0] + [t.num_rows for t in tables])
            tables = [
                t.filter(pa.array(keep[a:b])) for t, a, b in zip(tables, bounds, bounds[1:], strict=False)
            ]
        streams = [_decoded(cols, t, batch_rows) for t in tables if t.num_rows]
        for _place, record in heapq.merge(*streams, key=lambda item: item[0]):
            yield record

    def latest_records(self, topic: str) -> list[LakeRecord]:
        """The latest record per Kafka key (highest lake offset), in (partition, offset) order.

        A key found in several partitions (the partition count changed) keeps its most
        recently ingested record. Feature updates are newer-wins on (event time, write time)
        first, as in the online store: a backfill archived after the stream (in its own lake
        partitions) must not bring back an older value.
        """
        latest: dict[str | None, LakeRecord] = {}
        for rec in self.iter_records(topic):
            prev = latest.get(rec.key)
            if prev is None or _newer(rec, prev):
                latest[rec.key] = rec
        return sorted(latest.values(), key=lambda r: (r.partition, r.offset))


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name in table.column_names:
        return table.column(name).cast(pa.string())
    return pa.chunked_array([pa.nulls(table.num_rows, pa.string())])


def _ints(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(), dtype=np.int64)


def _decoded(
    cols: EventColumns, table: pa.Table, batch_rows: int
) -> Iterator[tuple[tuple[int, int], LakeRecord]]:
    """One file's rows as ((partition, offset), record), decoded a batch at a time."""
    for start in range(0, table.num_rows, batch_rows):
        chunk = table.slice(start, batch_rows)
        meta: Sequence[list[Any]] = [
            chunk.column(name).to_pylist()
            for name in ("_topic", "_partition", "_offset", "_key", "_event_type", "_ingest_time")
        ]
        for record, (topic, partition, offset, key, event_type, ingest) in zip(
            cols.records(chunk), zip(*meta, strict=True), strict=True
        ):
            yield (partition, offset), LakeRecord(topic, partition, offset, key, event_type, record, ingest)


def _newer(rec: LakeRecord, prev: LakeRecord) -> bool:
    if rec.event_type == "feature_update":
        mine = (rec.record["event_time"], rec.record["write_time"])
        theirs = (prev.record["event_time"], prev.record["write_time"])
        if mine != theirs:
            return mine > theirs
    if prev.partition == rec.partition:
        return rec.offset > prev.offset
    return rec.ingest_time >= prev.ingest_time
