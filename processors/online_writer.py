"""The online-store writer: feature-update events -> the online store, newer-wins.

Each update's window tiles go with its values, so reads evaluate windows at their own time.

Idempotent by construction: the store compares event times per (feature set, entity), so a
replayed or late update never overwrites a newer value and an equal one is a no-op.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from processors.runtime import Effects
from serving.online_store import OnlineStore, Row
from streams.consumer import Event

__all__ = ["OnlineStoreWriter"]


class OnlineStoreWriter:
    """Applies feature updates to an online store, batched per feature set."""

    def __init__(self, store: OnlineStore, ttls_s: Mapping[str, int | None] | None = None) -> None:
        self.name = "online-store-writer"
        self.inputs = ["feature-updates"]
        self.event_time_aligned = False  # newer-wins makes arrival order irrelevant
        self.store = store
        self.ttls_s = dict(ttls_s or {})
        self._pending: dict[str, list[Row]] = defaultdict(list)
        self.written = 0

    def handle(self, events: list[Event], write_time_ms: int) -> Effects:
        for event in events:
            r = event.record
            self._pending[r["feature_set"]].append(
                (r["entity_key"], r["event_time"], r["values"], r.get("valid_until"), r.get("tiles"))
            )
        return Effects()

    def should_flush(self, now_s: float) -> bool:
        return True  # every batch: state and store writes stay small and freshness high

    def flush_effects(self) -> None:
        for feature_set, rows in self._pending.items():
            self.written += self.store.put_batch(feature_set, rows, ttl_s=self.ttls_s.get(feature_set))
        self._pending.clear()

    def state_changes(self) -> dict[str, bytes | None]:
        return {}
