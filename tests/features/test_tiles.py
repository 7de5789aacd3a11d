"""Windows read at any time: an update's tiles evaluated later equal a brute-force reading.

Every update carries its entity's tiles; a reader at time r evaluates the windows at r from
them. These tests hold that evaluation to the oracle (tests/features/oracle.py), which
aggregates the accepted events in [window_start(r), r] from scratch, for every aggregation
kind, at random times after the update, including long after the last event (an inactive
entity's short windows read empty).
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features import Aggregator
from features.engine import evaluate_tiles, tiles_layout
from features.examples.clickstream import item_activity, user_activity
from headwater.sample_data import iter_events
from tests.features.oracle import accepted, values_at
from tests.features.test_engine import BASE, FS, M, S, arrivals, click, replay, same

H = 3600 * S


def latest_per_time(updates: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """The last update emitted per (entity, event time): what newer-wins keeps."""
    return {(u["entity_key"], u["event_time"]): u for u in updates}


def check_reads(
    fs: Any, arrivals: list[dict[str, Any]], updates: list[dict[str, Any]], rng: random.Random
) -> int:
    """Each kept update, evaluated at its own time, before valid_until and at random later times."""
    kept = accepted(fs, arrivals)
    by_entity: dict[str, list[dict[str, Any]]] = {}
    for e in kept:
        by_entity.setdefault(str(e[fs.entity]), []).append(e)
    for events in by_entity.values():
        events.sort(key=lambda e: e["event_time"])
    times = {k: [e["event_time"] for e in v] for k, v in by_entity.items()}
    checked = 0
    for (entity, t), update in latest_per_time(updates).items():
        seen = by_entity[entity][: bisect_right(times[entity], t)]
        assert update["valid_until"] > t
        reads = [t, update["valid_until"] - 1, update["valid_until"]]
        reads += [t + rng.randint(0, 10 * fs.max_window_ms) for _ in range(4)]
        reads += [t + fs.max_window_ms + rng.randint(0, 3 * H)]  # every window past its last event
        for r in reads:
            got, change = evaluate_tiles(update["tiles"], r)
            if change is not None:  # values hold until then
                assert change > r and same({0: evaluate_tiles(update["tiles"], change - 1)[0]}, {0: got})
            recent = seen[bisect_left(times[entity], r - fs.max_window_ms) :]  # the rest is outside
            assert same({0: got}, {0: values_at(fs, recent, r)}), (entity, t, r, got)
            if r < update["valid_until"]:  # nothing left a window yet (float sums of out-of-order
                # events are added in another order than the stored ones: equal to 1e-12)
                assert same({0: got}, {0: update["values"]}), (entity, t, r)
            checked += 1
    return checked


def test_tiles_carry_their_layout_and_an_inactive_entity_reads_empty_windows() -> None:
    agg = Aggregator(FS)
    events = [click(BASE, action="CLICK", item="a"), click(BASE + 10 * S, item="b")]
    updates = [u for e in events for u in agg.apply(e, write_time=7)]
    last = updates[-1]
    assert tiles_layout(last["tiles"]) == FS.layout_id
    # The 1 s windows hold only the 10 s event: they empty when its tile leaves, 1 s later.
    assert last["valid_until"] == BASE + 11 * S
    assert evaluate_tiles(last["tiles"], BASE + 11 * S)[0]["items_1s"] == 0
    six_days_later, never = evaluate_tiles(last["tiles"], BASE + 6 * 24 * H)
    assert six_days_later == {
        "n_30s": 0, "n_5m": 0, "clicks_5m": 0, "clicks_1h": 0, "pos_5m": 0, "prop_1h": 0.0,
        "mean_prop_5m": None, "min_pos_1s": None, "min_pos_1h": None, "max_pos_30s": None,
        "last_item_1s": None, "last_item_5m": None, "items_1s": 0, "items_1h": 0, "ctr_5m": None,
    }  # fmt: skip
    assert never is None  # every window is empty for good
    # Half an hour on, the hour windows still hold both events.
    half_hour, change = evaluate_tiles(last["tiles"], BASE + 30 * M)
    assert (half_hour["clicks_1h"], half_hour["items_1h"], half_hour["n_5m"]) == (1, 2, 0)
    assert change == (BASE // M + 60) * M  # the hour windows' first tile (of a minute) leaves


@settings(max_examples=120, deadline=None)
@given(arrivals, st.integers(0, 2**32))
def test_tiles_evaluate_to_the_written_semantics_at_any_later_time(
    raw: list[tuple[Any, ...]], seed: int
) -> None:
    arrival, updates = replay(raw)
    check_reads(FS, arrival, updates, random.Random(seed))


@pytest.mark.parametrize("fs", [user_activity, item_activity], ids=lambda fs: fs.name)
def test_tiles_of_the_real_clickstream_read_right_at_random_times(fs: Any) -> None:
    clicks = [e for topic, e in iter_events("men") if topic == "clicks"]
    agg = Aggregator(fs)
    updates = [u for e in clicks for u in agg.apply(e, write_time=0)]
    rng = random.Random(5)
    sample = rng.sample(updates, 300)
    last = {(u["entity_key"], u["event_time"]): u for u in updates}
    picked = [u for u in sample if last[(u["entity_key"], u["event_time"])] is u]
    assert check_reads(fs, clicks, picked, rng) > 1000


def test_distinct_counts_from_busy_and_quiet_tiles_together() -> None:
    """A tile with many distinct values writes its sketch as a mask's bytes, a quiet one as bucket
    numbers; a window holding both (and an own tile of either kind) evaluates like the oracle."""
    rng = random.Random(5)
    events = []
    for minute in range(0, 120, 3):  # 1h window: 1-minute tiles, some busy, most quiet
        busy = minute % 9 == 0
        for k in range(40 if busy else 2):
            item = f"i{rng.randrange(400)}" if busy else f"q{rng.randrange(6)}"
            t = BASE + minute * M + k * 100
            events.append(click(t, item=item, event_id=f"e{minute}-{k}"))
    agg = Aggregator(FS)
    updates = [u for e in events for u in agg.apply(e, write_time=e["event_time"])]
    dense = 0
    for update in updates[:: max(1, len(updates) // 60)]:
        t = update["event_time"]
        dense += b"\xc4" in update["tiles"]  # msgpack bin: a busy tile's sketch bytes
        for r in (t, t + rng.randint(0, 90 * M), t + 59 * M):
            got, _ = evaluate_tiles(update["tiles"], r)
            seen = [e for e in events if e["event_time"] <= t]
            assert got["items_1h"] == values_at(FS, seen, r)["items_1h"], (t, r)
    assert dense > 0  # the dense form was met
