"""The streaming engine on crafted cases: window boundaries, ties, lateness, state round trips."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features import (
    Aggregator,
    ApproxDistinct,
    Count,
    EntityState,
    Eq,
    EventRejected,
    FeatureSet,
    Last,
    Max,
    Mean,
    Min,
    Ratio,
    Sum,
)
from tests.features.oracle import expected, last_updates

BASE = 1_700_000_000_000  # a boundary of every tile size
S, M = 1000, 60_000

FS = FeatureSet(
    "engine_test",
    entity="user_id",
    source="clicks",
    owner="test",
    description="every aggregation over short windows",
    features=[
        Count(windows=["30s", "5m"], name="n"),
        Count(windows=["5m", "1h"], where=Eq("action", "CLICK"), name="clicks"),
        Sum("position", windows=["5m"], name="pos"),
        Sum("propensity", windows=["1h"], name="prop"),
        Mean("propensity", windows=["5m"], name="mean_prop"),
        Min("position", windows=["1s", "1h"], name="min_pos"),
        Max("position", windows=["30s"], name="max_pos"),
        Last("item_id", windows=["1s", "5m"], name="last_item"),
        ApproxDistinct("item_id", windows=["1s", "1h"], name="items"),
        Ratio(Count(where=Eq("action", "CLICK")), Count(), windows=["5m"], name="ctr"),
    ],
    lateness="1m",
)


def click(
    t: int, user: str = "u1", action: str = "IMPRESSION", item: str = "i1", **extra: Any
) -> dict[str, Any]:
    event = {
        "event_id": f"{user}-{t}-{action}-{item}",
        "event_time": t,
        "user_id": user,
        "item_id": item,
        "action": action,
        "position": 1,
        "campaign": "all",
        "propensity": 0.25,
        "session_id": None,
        "user_features": {},
    }
    event.update(extra)
    return event


def run(events: Iterable[dict[str, Any]], fs: FeatureSet = FS) -> tuple[Aggregator, list[dict[str, Any]]]:
    agg = Aggregator(fs)
    updates: list[dict[str, Any]] = []
    for e in events:
        updates += agg.apply(e, write_time=7)
    return agg, updates


def same(a: dict[Any, dict[str, Any]], b: dict[Any, dict[str, Any]]) -> bool:
    """Equal, floats to 1e-12 relative (the engine adds per tile, the oracle event by event)."""
    if a.keys() != b.keys():
        return False
    for key, values in a.items():
        for name, x in values.items():
            y = b[key][name]
            if isinstance(x, float) and isinstance(y, float):
                if not math.isclose(x, y, rel_tol=1e-12):
                    return False
            elif x != y:
                return False
    return True


def test_update_record_shape() -> None:
    _, updates = run([click(BASE)])
    (u,) = updates
    assert u["feature_set"] == "engine_test" and u["feature_set_version"] == 1 and u["source"] == "STREAM"
    assert (u["entity_key"], u["event_time"], u["write_time"]) == ("u1", BASE, 7)
    assert u["values"] == {
        "n_30s": 1, "n_5m": 1, "clicks_5m": 0, "clicks_1h": 0, "pos_5m": 1, "prop_1h": 0.25,
        "mean_prop_5m": 0.25, "min_pos_1s": 1, "min_pos_1h": 1, "max_pos_30s": 1, "last_item_1s": "i1",
        "last_item_5m": "i1", "items_1s": 1, "items_1h": 1,
        "ctr_5m": 0.0,
    }  # fmt: skip
    # Deterministic ids: a replay produces the same ones.
    assert run([click(BASE)])[1][0]["event_id"] == u["event_id"]


def test_event_exactly_at_the_window_start_is_inside() -> None:
    w = 5 * M  # tiles of 5 s: the window of t starts at (t // 5 s - 59) * 5 s
    _, updates = run([click(BASE), click(BASE + w - 1), click(BASE + w)])
    assert [u["values"]["n_5m"] for u in updates] == [1, 2, 2]  # BASE drops out at BASE + 5m
    _, updates = run([click(BASE - 1), click(BASE + w - 1)])
    assert updates[-1]["values"]["n_5m"] == 1  # a millisecond before the start: outside


def test_window_covers_whole_tiles_before_the_current_one() -> None:
    # At BASE + 5m + 4.999 s the window starts at BASE + 5 s: an event at BASE + 4.999 s is
    # out although it is less than 5 minutes old (the window spans W - tile .. W).
    _, updates = run([click(BASE + 4_999), click(BASE + 5 * S), click(BASE + 5 * M + 4_999)])
    assert updates[-1]["values"]["n_5m"] == 2


def test_events_at_the_same_time_all_count_in_the_last_update() -> None:
    _, updates = run([click(BASE, action="IMPRESSION"), click(BASE, action="CLICK")])
    assert [u["event_time"] for u in updates] == [BASE, BASE]
    assert updates[0]["values"]["clicks_5m"] == 0  # superseded by the next update at the same time
    assert updates[1]["values"]["n_5m"] == 2 and updates[1]["values"]["ctr_5m"] == 0.5


def test_last_breaks_ties_by_event_id_whatever_the_arrival_order() -> None:
    a = click(BASE, item="a", event_id="e1")
    b = click(BASE, item="b", event_id="e2")
    assert run([a, b])[1][-1]["values"]["last_item_5m"] == "b"
    assert run([b, a])[1][-1]["values"]["last_item_5m"] == "b"


def test_out_of_order_within_lateness_gets_its_value_and_corrections() -> None:
    events = [click(BASE), click(BASE + 30 * S), click(BASE + 40 * S), click(BASE + 10 * S, action="CLICK")]
    agg, updates = run(events)
    own, *corrections = updates[3:]
    assert (
        own["event_time"] == BASE + 10 * S and own["values"]["n_5m"] == 2 and own["values"]["clicks_5m"] == 1
    )
    assert [(c["event_time"], c["values"]["n_5m"], c["values"]["clicks_5m"]) for c in corrections] == [
        (BASE + 30 * S, 3, 1),
        (BASE + 40 * S, 4, 1),  # the entity's latest time comes last, so compaction keeps it
    ]
    assert len({u["event_id"] for u in updates}) == len(updates)
    assert agg.stats["out_of_order"] == 1 and agg.stats["corrections"] == 2
    assert same(last_updates(updates), expected(FS, events))
    # ... and the next in-order event sees it too.
    _, more = run([*events, click(BASE + 50 * S)])
    assert more[-1]["values"]["n_5m"] == 5


def test_out_of_order_event_outside_a_later_window_corrects_only_the_windows_it_is_in() -> None:
    # 30 s windows have 1 s tiles: at BASE + 45 s the 30 s window starts at BASE + 16 s.
    events = [click(BASE), click(BASE + 45 * S), click(BASE + 10 * S)]
    _, updates = run(events)
    correction = updates[-1]
    assert correction["event_time"] == BASE + 45 * S
    assert correction["values"]["n_30s"] == 1 and correction["values"]["n_5m"] == 3


def test_too_late_events_are_rejected_and_change_nothing() -> None:
    agg, _ = run([click(BASE), click(BASE + 120 * S)])
    with pytest.raises(EventRejected) as info:
        agg.apply(click(BASE + 59 * S), write_time=7)  # 61 s behind the latest event, lateness 60 s
    assert info.value.reason == "too_late" and agg.stats["rejected_too_late"] == 1
    accepted = agg.apply(click(BASE + 60 * S), write_time=7)  # exactly 60 s behind: accepted
    assert accepted[0]["values"]["n_5m"] == 2 and accepted[-1]["values"]["n_5m"] == 3
    assert agg.apply(click(BASE + 121 * S), write_time=7)[0]["values"]["n_5m"] == 4


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"user_id": None}, "missing_entity"), ({"user_id": ""}, "missing_entity"),
     ({"event_time": None}, "bad_event_time"), ({"event_time": -5}, "bad_event_time"),
     ({"event_id": ""}, "missing_event_id")],
)  # fmt: skip
def test_bad_events_are_rejected_with_a_reason(change: dict[str, Any], reason: str) -> None:
    agg = Aggregator(FS)
    with pytest.raises(EventRejected) as info:
        agg.apply({**click(BASE), **change}, write_time=0)
    assert info.value.reason == reason and not agg.states


def test_state_round_trips_through_bytes_mid_stream() -> None:
    rng = random.Random(3)
    events = [
        click(
            BASE + i * 997 + rng.randint(-20_000, 0),  # many out of order, within lateness
            user=f"u{rng.randint(1, 4)}",
            item=f"i{rng.randint(1, 9)}",
            action=rng.choice(["IMPRESSION", "CLICK"]),
            position=rng.randint(1, 3),
        )
        for i in range(600)
    ]
    _, straight = run(events)
    first = Aggregator(FS)
    updates = [u for e in events[:300] for u in first.apply(e, write_time=7)]
    restored = Aggregator(FS, {k: EntityState.from_bytes(s.to_bytes()) for k, s in first.states.items()})
    restored.max_time = first.max_time  # the stream's watermark, which a processor stores with the states
    updates += [u for e in events[300:] for u in restored.apply(e, write_time=7)]
    assert updates == straight


def test_idle_entities_are_evicted() -> None:
    agg, _ = run([click(BASE, user="old"), click(BASE + 2 * 3600 * S, user="new")])
    assert agg.evict_idle(before=BASE + 3600 * S) == 1 and list(agg.states) == ["new"]


def test_generated_code_is_inspectable() -> None:
    agg = Aggregator(FS)
    assert "r.get('action') == 'CLICK'" in agg.contributions_source
    assert "'ctr_5m':" in agg.values_source


arrivals = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 10 * M), st.integers(0, 3 * 3600 * S)),  # event time offset: dense or spread
        st.one_of(st.just(0), st.integers(0, 90 * S), st.integers(0, 5 * M)),  # delay; lateness is 60 s
        st.sampled_from(["u1", "u2", "u3"]),
        st.sampled_from(["IMPRESSION", "CLICK"]),
        st.integers(1, 3),
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.one_of(st.none(), st.sampled_from([0.1, 0.25, 0.3])),
    ),
    max_size=80,
)


def replay(raw: list[tuple[Any, ...]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``arrivals``' draws as events in arrival order, and the updates FS's engine makes of them."""
    events = [
        (
            t + delay,
            click(BASE + t, user=u, action=a, item=item, position=p, propensity=prop, event_id=f"e{i}"),
        )
        for i, (t, delay, u, a, p, item, prop) in enumerate(raw)
    ]
    arrival = [e for _, e in sorted(events, key=lambda x: x[0])]
    agg = Aggregator(FS)
    updates: list[dict[str, Any]] = []
    for e in arrival:
        try:
            updates += agg.apply(e, write_time=0)
        except EventRejected as exc:
            assert exc.reason == "too_late"
    return arrival, updates


@settings(max_examples=150, deadline=None)
@given(arrivals)
def test_engine_matches_the_written_semantics_in_any_arrival_order(raw: list[tuple[Any, ...]]) -> None:
    arrival, updates = replay(raw)
    assert same(last_updates(updates), expected(FS, arrival))
