"""A brute-force reading of the window semantics in features.windows, for checking engines.

It knows nothing about tiles kept, snapshots or corrections: for every (entity, event
time) it takes the accepted events whose event time lies in [window_start(t, W), t] and
aggregates them from scratch, in event-time order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from features.definitions import Aggregation, FeatureSet, Ratio
from features.windows import distinct_bucket, distinct_estimate, window_start

Key = tuple[str, int]


def _one_partition(_: Mapping[str, Any]) -> Hashable:
    return 0


def accepted(
    fs: FeatureSet,
    arrivals: Iterable[Mapping[str, Any]],
    partition: Callable[[Mapping[str, Any]], Hashable] = _one_partition,
) -> list[Mapping[str, Any]]:
    """The events the rules keep, given the order each partition delivers them in.

    An event is too late when it is more than the lateness behind the largest event time
    accepted before it from its own partition; an event id seen before counts once.
    """
    latest: dict[Hashable, int] = {}
    seen: set[str] = set()
    kept = []
    for e in arrivals:
        p = partition(e)
        if p in latest and e["event_time"] < latest[p] - fs.lateness_ms:
            continue
        if e["event_id"] in seen:
            continue
        seen.add(e["event_id"])
        latest[p] = max(latest.get(p, e["event_time"]), e["event_time"])
        kept.append(e)
    return kept


def _agg(agg: Aggregation, events: list[Mapping[str, Any]]) -> Any:
    if isinstance(agg, Ratio):
        num, den = _agg(agg.numerator, events), _agg(agg.denominator, events)
        return num / den if den else None
    test = agg.where.to_python() if agg.where is not None else (lambda r: True)
    chosen = [e for e in events if test(e)]
    if agg.kind == "count":
        return len(chosen)
    values = [e[agg.field] for e in chosen if e.get(agg.field) is not None]  # type: ignore[index]
    if agg.kind == "sum":
        total: Any = 0.0 if values and isinstance(values[0], float) else 0
        for v in values:
            total += v
        return total
    if agg.kind == "mean":
        return sum(values) / len(values) if values else None
    if agg.kind == "min":
        return min(values, default=None)
    if agg.kind == "max":
        return max(values, default=None)
    if agg.kind == "last":
        pairs = [
            (e["event_time"], e["event_id"], e[agg.field]) for e in chosen if e.get(agg.field) is not None
        ]  # type: ignore[index]
        return max(pairs, key=lambda p: (p[0], p[1]))[2] if pairs else None
    return distinct_estimate(len({distinct_bucket(v) for v in values}))


def expected(
    fs: FeatureSet,
    arrivals: Iterable[Mapping[str, Any]],
    partition: Callable[[Mapping[str, Any]], Hashable] = _one_partition,
) -> dict[Key, dict[str, Any]]:
    """Values at every (entity, event time) of an accepted event."""
    by_entity: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for e in accepted(fs, arrivals, partition):
        by_entity[str(e[fs.entity])].append(e)
    out: dict[Key, dict[str, Any]] = {}
    for key, events in by_entity.items():
        events.sort(key=lambda e: e["event_time"])
        for t in sorted({e["event_time"] for e in events}):
            out[(key, t)] = values_at(fs, events, t)
    return out


def values_at(fs: FeatureSet, events: Iterable[Mapping[str, Any]], t: int) -> dict[str, Any]:
    """Every feature of one entity at any time t, from its accepted events (those after t ignored)."""
    chosen = list(events)
    return {
        f.name: _agg(
            f.aggregation, [e for e in chosen if window_start(t, f.window_ms) <= e["event_time"] <= t]
        )
        for f in fs.features
    }


def last_updates(updates: Iterable[Mapping[str, Any]]) -> dict[Key, dict[str, Any]]:
    """The last update emitted per (entity, event time): what newer-wins and compaction keep."""
    return {(u["entity_key"], u["event_time"]): dict(u["values"]) for u in updates}


def same_tiles(a: bytes, b: bytes) -> bool:
    """Two updates' tiles hold the same partials, float sums to 1e-12 relative (a running sum over
    events in one millisecond may add them in another order)."""
    import msgpack

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            return isinstance(x, float) and isinstance(y, float) and abs(x - y) <= 1e-12 * max(abs(x), abs(y))
        if isinstance(x, list) and isinstance(y, list):
            return len(x) == len(y) and all(map(same, x, y))
        return bool(x == y)

    return same(msgpack.unpackb(a), msgpack.unpackb(b))
