"""Reading a topic back from the lake: whole tables, Avro-shaped records, latest per key.

The broker-restore step of ``headwater up`` replays the compacted topics (``models``,
``experiments``, ``bandit-state``, ``feature-updates``) into an empty broker with
:meth:`LakeReader.latest_records`: for each Kafka key, the record at the highest lake offset,
which is what log compaction would have kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from headwater.settings import Settings
from processors.lake.columns import EventColumns, event_columns
from processors.lake.writer import TopicLake, topic_spec
from streams.catalog import SchemaCatalog

__all__ = ["LakeReader", "LakeRecord"]


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
        """Every row of a topic, ordered by partition and offset; empty (with columns) if none."""
        spec = topic_spec(topic, self.prefix)
        cols = self._columns(topic)
        tables = [
            pq.read_table(path)
            for _name, paths in sorted(TopicLake(self.root, spec.logical).files().items())
            for path in paths
        ]
        if not tables:
            return cols.arrow_schema().empty_table()
        # Files written by older schema versions miss later columns: promote fills nulls.
        table = pa.concat_tables(tables, promote_options="permissive")
        return table.sort_by([("_partition", "ascending"), ("_offset", "ascending")])

    def iter_records(self, topic: str, batch_rows: int = 10_000) -> Iterator[LakeRecord]:
        """Records of a topic in (partition, offset) order, in the topic's latest Avro shape."""
        cols = self._columns(topic)
        table = self.read_topic(topic)
        for batch in table.to_batches(max_chunksize=batch_rows):
            for row in batch.to_pylist():
                yield LakeRecord(
                    row["_topic"],
                    row["_partition"],
                    row["_offset"],
                    row["_key"],
                    row["_event_type"],
                    cols.from_row(row),
                    row["_ingest_time"],
                )

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


def _newer(rec: LakeRecord, prev: LakeRecord) -> bool:
    if rec.event_type == "feature_update":
        mine = (rec.record["event_time"], rec.record["write_time"])
        theirs = (prev.record["event_time"], prev.record["write_time"])
        if mine != theirs:
            return mine > theirs
    if prev.partition == rec.partition:
        return rec.offset > prev.offset
    return rec.ingest_time >= prev.ingest_time
