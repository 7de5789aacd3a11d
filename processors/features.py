"""The streaming feature processor: one feature set's source events -> feature-update events.

Pure logic: :class:`features.engine.Aggregator` folds each event into its entity's state and
returns the updates; this class adapts it to the runtime (rejected events become dead
letters with the engine's reason, state goes to the runner's store) and keeps the
watermarks that lateness is judged against.

**Watermarks.** Each input partition's watermark is the largest event time accepted from
it. An event is too late when it is more than the feature set's lateness behind its *own
partition's* watermark: a function of what that partition delivered before it, so a backlog
fetched in any interleaving of partitions, live processing and a restart accept and reject
the same events (other partitions racing ahead cannot make an event late). Across
partitions, the low watermark (the smallest over the assigned partitions) minus the lateness
is the state's *horizon*: no event below it can still be accepted, so the engine keeps
nothing older (out-of-order snapshots, tiles). A partition assigned but silent holds the
horizon back until it has delivered nothing for ``idle_partition_ms`` of processing time;
from then on it is *idle* and left out, so one quiet partition cannot make the state grow
without bound. The horizon never moves back, so events an idle partition delivers later
that are below it are too late (dead-lettered), which is the one case where timing decides.
The watermarks are committed with the state and the input positions they reflect.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping

from features.definitions import FeatureSet
from features.engine import Aggregator, EntityState
from processors.runtime import Effects, record_fault
from processors.state_store import META_PREFIX
from streams.consumer import Event

__all__ = ["WATERMARKS_KEY", "FeatureProcessor"]

WATERMARKS_KEY = META_PREFIX + "watermarks"  # in the processor's state store, beside the entities' states

Partition = tuple[str, int]  # logical topic, partition


class FeatureProcessor:
    """Computes one feature set from its source topic."""

    def __init__(
        self,
        feature_set: FeatureSet,
        states: MutableMapping[str, EntityState],
        *,
        commit_interval_s: float = 5.0,
        max_future_ms: int | None = 300_000,
        idle_partition_ms: int = 30_000,
        watermarks: bytes | None = None,
    ) -> None:
        self.name = f"features-{feature_set.name}"
        self.inputs = [feature_set.source]
        self.outputs = ["feature-updates"]
        # Entities other than the topic key (items on a user-keyed topic) span partitions.
        self.event_time_aligned = True
        self.feature_set = feature_set
        self._states = states
        self.aggregator = Aggregator(feature_set, states, max_future_ms=max_future_ms)
        self.commit_interval_s = commit_interval_s
        self._flushed_at = float("-inf")
        self._lateness = feature_set.lateness_ms
        self._idle_ms = idle_partition_ms
        self._marks: dict[Partition, int] = {}  # watermark per input partition
        self._horizon: int | None = None  # nothing below it can be accepted any more
        if watermarks is not None:
            saved = json.loads(watermarks)
            self._marks = {(t, p): m for t, p, m in saved["marks"]}
            self._horizon = saved["horizon"]
        self._heard: dict[Partition, int] = {}  # processing time each partition last delivered
        self._assigned: set[Partition] | None = None  # None: never told (a test, a single reader)
        self._marks_changed = False

    @property
    def horizon(self) -> int | None:
        return self._horizon

    def watermark(self, topic: str, partition: int) -> int | None:
        return self._marks.get((topic, partition))

    def watch(self, assigned: set[Partition]) -> None:
        """The input partitions this processor reads now (the host calls it before each batch)."""
        self._assigned = assigned

    def handle(self, events: list[Event], write_time_ms: int) -> Effects:
        effects = Effects()
        apply, outputs, marks = self.aggregator.apply, effects.outputs, self._marks
        lateness, horizon = self._lateness, self._horizon
        keep = 0 if horizon is None else horizon  # no horizon yet: keep everything
        heard = self._heard
        for event in events:
            tp = (event.topic, event.partition)
            heard[tp] = write_time_ms
            mark = marks.get(tp)
            late_before = keep if mark is None else max(mark - lateness, keep)
            try:
                updates = apply(event.record, write_time_ms, late_before=late_before, horizon=keep)
            except Exception as exc:  # EventRejected, or any other failure on this one record
                if not record_fault(exc):
                    raise  # the state store or the like failed: stop, nothing committed past it
                effects.rejected.append((event, exc))
                continue
            t = event.record["event_time"]
            if mark is None or t > mark:
                marks[tp] = t
                self._marks_changed = True
            outputs.extend(("feature-updates", update) for update in updates)
        self._advance_horizon(write_time_ms)
        return effects

    def _advance_horizon(self, now_ms: int) -> None:
        """The low watermark of the partitions not idle, minus the lateness (never backwards)."""
        partitions = self._assigned if self._assigned is not None else set(self._marks)
        heard, lows = self._heard, []
        for tp in partitions:
            last = heard.setdefault(tp, now_ms)  # newly assigned: idle only after a full period
            if now_ms - last >= self._idle_ms:
                continue
            mark = self._marks.get(tp)
            if mark is None:  # assigned, not idle yet, nothing delivered: it may bring anything
                return
            lows.append(mark)
        if lows:
            low = min(lows) - self._lateness
            if self._horizon is None or low > self._horizon:
                self._horizon = low
                self._marks_changed = True

    def should_flush(self, now_s: float) -> bool:
        # The state (and its input positions) is committed once per ``commit_interval_s`` (5 s,
        # Quix Streams' default commit interval too), not after every batch. A busy entity's state
        # holds a snapshot per event time within the lateness, so at a few hundred events/s it is
        # hundreds of KB of JSON, and serializing it after every batch took a quarter of a core
        # at 5,000 events/s. Freshness does not wait for commits: feature updates are published
        # as each batch is handled. A crash replays at most one interval, with identical updates.
        if now_s - self._flushed_at >= self.commit_interval_s:
            self._flushed_at = now_s
            return True
        return False

    def flush_effects(self) -> None:
        """Feature updates are Kafka outputs; nothing else to make durable."""

    def state_changes(self) -> dict[str, bytes | None]:
        changes = getattr(self._states, "changes", None)
        out: dict[str, bytes | None] = changes() if changes is not None else {}
        if self._marks_changed:
            marks = [[t, p, m] for (t, p), m in sorted(self._marks.items())]
            out[WATERMARKS_KEY] = json.dumps({"marks": marks, "horizon": self._horizon}).encode()
            self._marks_changed = False
        return out
