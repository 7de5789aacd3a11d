"""The online-store writer: feature-update events -> the online store, newer-wins.

Each update's window tiles go with its values, so reads evaluate windows at their own time.

Idempotent by construction: the store compares event times per (feature set, entity), so a
replayed or late update never overwrites a newer value and an equal one is a no-op.

An update the store refuses for its content (an entity key longer than LMDB's keys, a value
the store cannot encode) is rejected alone: when a batch write fails for such a reason the
rows are written one by one and those refused are dead-lettered. A failure of the store itself
(a corrupted page, a full map, a lost connection: :func:`processors.runtime.record_fault`) stops
the writer instead, with nothing committed past the batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from processors.runtime import Effects, Rejected, record_fault
from serving.online_store import OnlineStore, Row
from streams.consumer import Event

__all__ = ["OnlineStoreWriter"]


class OnlineStoreWriter:
    """Applies feature updates to an online store, batched per feature set."""

    def __init__(self, store: OnlineStore, ttls_s: Mapping[str, int | None] | None = None) -> None:
        self.name = "online-store-writer"
        self.inputs = ["feature-updates"]
        self.outputs: list[str] = []
        self.event_time_aligned = False  # newer-wins makes arrival order irrelevant
        self.store = store
        self.ttls_s = dict(ttls_s or {})
        self._pending: dict[str, list[Row]] = defaultdict(list)
        self._events: dict[str, list[Event]] = defaultdict(list)  # beside _pending: whose row it is
        self.written = 0

    def handle(self, events: list[Event], write_time_ms: int) -> Effects:
        effects = Effects()
        for event in events:
            r = event.record
            try:
                row = (r["entity_key"], r["event_time"], r["values"], r.get("valid_until"), r.get("tiles"))
                feature_set = r["feature_set"]
            except Exception as exc:  # a record without the fields of its schema: that record alone
                effects.rejected.append((event, exc))
                continue
            self._pending[feature_set].append(row)
            self._events[feature_set].append(event)
        return effects

    def should_flush(self, now_s: float) -> bool:
        return True  # every batch: state and store writes stay small and freshness high

    def flush_effects(self) -> Rejected:
        rejected: Rejected = []
        for feature_set, rows in self._pending.items():
            ttl_s = self.ttls_s.get(feature_set)
            try:
                self.written += self.store.put_batch(feature_set, rows, ttl_s=ttl_s)
            except Exception as exc:
                if not record_fault(exc):
                    raise
                # One row at a time, in order (what put_batch does within a batch): only the
                # rows refused alone are rejected.
                for row, event in zip(rows, self._events[feature_set], strict=True):
                    try:
                        self.written += self.store.put_batch(feature_set, [row], ttl_s=ttl_s)
                    except Exception as row_error:
                        if not record_fault(row_error):
                            raise
                        rejected.append((event, row_error))
        self._pending.clear()
        self._events.clear()
        return rejected

    def state_changes(self) -> dict[str, bytes | None]:
        return {}
