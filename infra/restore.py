"""Restoring a fresh embedded broker from the lake (DESIGN.md §5).

The embedded broker keeps data in memory only. When ``headwater up`` starts a new one, the
compacted topics (``models``, ``experiments``, ``bandit-state``, ``feature-updates``) get back
the latest record per key from the lake, in the partitions they had, before any service
starts; the lake then begins a new epoch so those copies are not archived a second time;
and processors forget their input positions (offsets restart at 0), keeping their state.
"""

from __future__ import annotations

import logging
from pathlib import Path

from headwater.settings import Settings
from processors.lake import LakeReader, LakeWriter
from processors.state_store import StateStore
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TOPICS, TopicCatalog

__all__ = ["COMPACTED_TOPICS", "restore_from_lake"]

log = logging.getLogger(__name__)

COMPACTED_TOPICS = [s.logical for s in TOPICS if s.compacted]


def restore_from_lake(settings: Settings, serde: Serde) -> dict[str, int]:
    """Replay the lake's latest record per key of each compacted topic; returns counts per topic."""
    reader = LakeReader(settings, serde.catalog)
    catalog = TopicCatalog(settings)
    restored: dict[str, dict[int, int]] = {}
    counts: dict[str, int] = {}
    with EventProducer(settings, serde, client_id="headwater-restore") as producer:
        for topic in COMPACTED_TOPICS:
            spec = catalog.spec(topic)
            partitions = catalog.partitions(spec)
            per_partition = restored.setdefault(topic, {})
            for rec in reader.latest_records(topic):
                value = serde.encode(spec.event_type, rec.record)
                key = (rec.key or spec.key(rec.record)).encode()
                # Same partition as before, so offsets 0..n-1 of each partition are the copies the
                # lake writer skips; a changed partition count falls back to the key's hash.
                partition = rec.partition if rec.partition < partitions else None
                producer.send_raw(catalog.name(topic), value, key=key, partition=partition)
                if partition is not None:
                    per_partition[partition] = per_partition.get(partition, 0) + 1
            counts[topic] = sum(per_partition.values())
        producer.flush()
    LakeWriter(settings, serde.catalog).begin_epoch(restored)
    for state_dir in sorted(Path(settings.data_dir / "state").glob("*")):
        store = StateStore(state_dir)
        try:
            store.reset_positions()
        finally:
            store.close()
    log.info("restored compacted topics from the lake: %s", counts)
    return counts
