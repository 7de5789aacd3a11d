"""The feature processor's watermarks, without a broker: per-partition lateness, the state
horizon, idle partitions, future events, and watermarks kept across a restart."""

from __future__ import annotations

from typing import Any

from features.engine import EntityState
from features.examples.clickstream import item_activity
from processors.features import WATERMARKS_KEY, FeatureProcessor
from streams.consumer import Event

T = 1_700_000_000_000
M = 60_000
NOW = T + 10 * M  # the time of processing in these tests


def event(partition: int, t: int, n: int, item: str = "i1") -> Event:
    record: dict[str, Any] = {
        "event_id": f"e{n}", "event_time": t, "user_id": f"u{partition}", "item_id": item,
        "action": "IMPRESSION", "position": 1, "campaign": "all", "propensity": 0.1, "session_id": None,
        "user_features": {},
    }  # fmt: skip
    return Event("clicks", partition, n, None, "click", record, {}, t)


def processor(
    watermarks: bytes | None = None, states: dict[str, EntityState] | None = None
) -> FeatureProcessor:
    return FeatureProcessor(
        item_activity, {} if states is None else states, idle_partition_ms=30_000, watermarks=watermarks
    )


def reasons(effects: Any) -> list[str]:
    return [str(exc).split(":")[0] for _, exc in effects.rejected]


def test_lateness_is_judged_against_the_events_own_partition() -> None:
    proc = processor()
    proc.watch({("clicks", 0), ("clicks", 1)})
    # Partition 0 runs five minutes ahead; partition 1's events are in order for partition 1, so
    # none is late although the item's latest event time is far ahead of them.
    effects = proc.handle([event(0, T + 5 * M, 1), event(1, T, 2), event(1, T + 10, 3)], NOW)
    assert reasons(effects) == [] and len(effects.outputs) >= 3
    # More than the lateness (1 minute) behind its own partition's watermark: too late.
    effects = proc.handle([event(1, T + 2 * M, 4), event(1, T + 10, 5), event(1, T + 61_000, 6)], NOW)
    assert reasons(effects) == ["too_late"]
    assert proc.watermark("clicks", 1) == T + 2 * M


def test_the_horizon_waits_for_a_silent_partition_until_it_is_idle() -> None:
    proc = processor()
    proc.watch({("clicks", 0), ("clicks", 1)})
    proc.handle([event(0, T + 5 * M, 1)], NOW)
    assert proc.horizon is None  # partition 1 may still bring anything: the state keeps it all
    proc.handle([event(0, T + 6 * M, 2)], NOW + 29_999)
    assert proc.horizon is None
    proc.handle([event(0, T + 7 * M, 3)], NOW + 30_000)  # partition 1 silent for 30 s: idle
    assert proc.horizon == T + 6 * M
    # What the idle partition brings later below the horizon is too late (the state is gone).
    effects = proc.handle([event(1, T + 5 * M, 4), event(1, T + 7 * M, 5)], NOW + 31_000)
    assert reasons(effects) == ["too_late"]


def test_future_events_are_refused_and_move_no_watermark() -> None:
    proc = processor()
    effects = proc.handle([event(0, NOW + 301_000, 1), event(0, T, 2)], NOW)
    assert reasons(effects) == ["future"]
    assert proc.watermark("clicks", 0) == T  # the wrong clock did not make the next event late
    assert proc.handle([event(0, NOW + 300_000, 3)], NOW).rejected == []  # the skew allowed: 5 min


def test_watermarks_and_the_horizon_survive_a_restart() -> None:
    states: dict[str, EntityState] = {}
    first = processor(states=states)
    first.watch({("clicks", 0)})
    first.handle([event(0, T + 5 * M, 1)], NOW)
    saved = first.state_changes()[WATERMARKS_KEY]
    assert saved is not None
    again = processor(watermarks=saved, states=states)
    assert (again.watermark("clicks", 0), again.horizon) == (T + 5 * M, first.horizon)
    assert reasons(again.handle([event(0, T + 3 * M, 2)], NOW)) == ["too_late"]  # as before the restart
    assert WATERMARKS_KEY not in again.state_changes()  # nothing moved: nothing to write
