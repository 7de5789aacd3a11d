"""A brute-force reading of the window semantics in features.windows, for checking engines.

It knows nothing about tiles kept, snapshots or corrections: for every (entity, event
time) it takes the accepted events whose event time lies in [window_start(t, W), t] and
aggregates them from scratch, in event-time order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from features.definitions import Aggregation, FeatureSet, Ratio
from features.windows import distinct_bucket, distinct_estimate, window_start

Key = tuple[str, int]


def accepted(fs: FeatureSet, arrivals: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The events the lateness rule keeps, given their arrival order."""
    latest: dict[str, int] = {}
    kept = []
    for e in arrivals:
        key = str(e[fs.entity])
        if key in latest and e["event_time"] < latest[key] - fs.lateness_ms:
            continue
        latest[key] = max(latest.get(key, e["event_time"]), e["event_time"])
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


def expected(fs: FeatureSet, arrivals: Iterable[Mapping[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Values at every (entity, event time) of an accepted event."""
    by_entity: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for e in accepted(fs, arrivals):
        by_entity[str(e[fs.entity])].append(e)
    out: dict[Key, dict[str, Any]] = {}
    for key, events in by_entity.items():
        events.sort(key=lambda e: e["event_time"])
        for t in sorted({e["event_time"] for e in events}):
            out[(key, t)] = {
                f.name: _agg(
                    f.aggregation,
                    [e for e in events if window_start(t, f.window_ms) <= e["event_time"] <= t],
                )
                for f in fs.features
            }
    return out


def last_updates(updates: Iterable[Mapping[str, Any]]) -> dict[Key, dict[str, Any]]:
    """The last update emitted per (entity, event time): what newer-wins and compaction keep."""
    return {(u["entity_key"], u["event_time"]): dict(u["values"]) for u in updates}
