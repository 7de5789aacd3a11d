"""One feature definition, one meaning: the streaming engine equals the ClickHouse backfill.

The real clickstream sample (Open Bandit Dataset, 10,000 logged recommendations, a week)
is replayed through the engine and the same events, written to Parquet, go through the
compiled SQL in chdb. For every (entity, event time) the last update the engine emitted
must equal the backfill's row, feature by feature.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import chdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import (
    Aggregator,
    And,
    Eq,
    EventRejected,
    FeatureSet,
    Ge,
    Gt,
    In,
    IsNull,
    Le,
    Lt,
    Ne,
    Not,
    NotNull,
    Or,
    backfill_sql,
)
from features.engine import evaluate_tiles
from features.examples.clickstream import item_activity, user_activity
from features.sql import tiles_sql, values_at_sql
from features.tiles import backfill_tiles
from headwater.sample_data import iter_events
from tests.features.oracle import accepted, expected, last_updates, same_tiles
from tests.features.oracle import values_at as oracle_values_at
from tests.features.test_engine import BASE, FS, click, same

Rows = dict[tuple[str, int], dict[str, Any]]
COLUMNS = ("event_id", "event_time", "user_id", "item_id", "action", "position", "campaign", "propensity")


def write_parquet(events: list[dict[str, Any]], path: Path) -> str:
    # The lake's column types: the Avro schema's int, long, string and nullable double.
    types = {"event_time": pa.int64(), "position": pa.int32(), "propensity": pa.float64()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])
    pq.write_table(pa.Table.from_pylist([{c: e[c] for c in COLUMNS} for e in events], schema), path)
    return f"file('{path}', Parquet)"


def backfill(fs: FeatureSet, relation: str, start: int = 0, end: int = 2**62) -> Rows:
    frame = chdb.query(backfill_sql(fs, relation, start, end), "DataFrame")
    rows: Rows = {}
    for record in frame.to_dict("records"):
        key = (record.pop("entity_key"), int(record.pop("event_time")))
        rows[key] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
    return rows


def stream(fs: FeatureSet, arrivals: list[dict[str, Any]]) -> Rows:
    agg = Aggregator(fs)
    return last_updates(u for e in arrivals for u in agg.apply(e, write_time=0))


@pytest.fixture(scope="module")
def clicks() -> list[dict[str, Any]]:
    return [e for topic, e in iter_events("all") if topic == "clicks"]


@pytest.fixture(scope="module")
def relation(clicks: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_parquet(clicks, tmp_path_factory.mktemp("lake") / "clicks.parquet")


@pytest.mark.parametrize("fs", [user_activity, item_activity], ids=lambda fs: fs.name)
def test_stream_equals_backfill_on_the_real_clickstream(
    fs: FeatureSet, clicks: list[Any], relation: str
) -> None:
    streamed, backfilled = stream(fs, clicks), backfill(fs, relation)
    assert len(backfilled) == len(streamed) > 9_000
    # Every value bit for bit, float means included: events arrive in event-time order, so
    # both engines add the same numbers in the same order.
    mismatches = [(k, streamed[k], backfilled.get(k)) for k in streamed if streamed[k] != backfilled.get(k)]
    assert not mismatches, mismatches[:3]
    assert any(v["clicks_24h"] for v in streamed.values())  # the sample's clicks do show up


@pytest.mark.parametrize("fs", [user_activity, item_activity], ids=lambda fs: fs.name)
def test_stream_equals_backfill_when_events_arrive_out_of_order(
    fs: FeatureSet, clicks: list[Any], relation: str
) -> None:
    rng = random.Random(5)
    delays = [rng.randint(1, fs.lateness_ms) if rng.random() < 0.2 else 0 for _ in clicks]
    order = sorted(range(len(clicks)), key=lambda i: (clicks[i]["event_time"] + delays[i], i))
    arrivals = [clicks[i] for i in order]
    assert arrivals != clicks
    # Floats to 1e-12 relative here: a late event is added to its tile after later ones.
    assert same(stream(fs, arrivals), backfill(fs, relation))


def test_backfill_of_a_time_range_counts_earlier_events_as_history(clicks: list[Any], relation: str) -> None:
    start, end = clicks[0]["event_time"] + 3 * 86_400_000, clicks[0]["event_time"] + 4 * 86_400_000
    full = stream(user_activity, clicks)
    ranged = backfill(user_activity, relation, start, end)
    assert ranged == {k: v for k, v in full.items() if start <= k[1] < end}
    assert any(v["impressions_7d"] > v["impressions_24h"] for v in ranged.values())


def test_backfill_equals_the_written_semantics_with_nulls_and_filters(tmp_path: Path) -> None:
    rng = random.Random(9)
    events = sorted(
        (click(BASE + rng.randint(0, 3 * 3_600_000), user=f"u{rng.randint(1, 3)}", item=rng.choice("abcdef"),
               action=rng.choice(["IMPRESSION", "CLICK"]), position=rng.randint(1, 3),
               propensity=rng.choice([None, 0.1, 0.25, 1 / 3]), event_id=f"e{i}")
         for i in range(400)),
        key=lambda e: e["event_time"],
    )  # fmt: skip
    relation = write_parquet(events, tmp_path / "crafted.parquet")
    assert same(backfill(FS, relation), expected(FS, events))
    assert same(backfill(FS, relation), stream(FS, events))


def test_filters_mean_the_same_in_python_and_sql(tmp_path: Path) -> None:
    events = [
        click(BASE + i, event_id=f"e{i}", action=a, position=p, propensity=pr, campaign=c)
        for i, (a, p, pr, c) in enumerate(
            [("CLICK", 1, 0.5, "men"), ("IMPRESSION", 2, None, "women"), ("CLICK", 3, 0.1, "all"),
             ("IMPRESSION", 1, 0.25, "men")]
        )
    ]  # fmt: skip
    relation = write_parquet(events, tmp_path / "filters.parquet")
    predicates = [
        Eq("action", "CLICK"), Ne("propensity", 0.5), Lt("propensity", 0.3), Ge("position", 2),
        Le("position", 1), In("campaign", ["men", "all"]), IsNull("propensity"), NotNull("propensity"),
        Not(Eq("propensity", 0.5)), And(Eq("action", "CLICK"), Gt("propensity", 0.2)),
        Or(IsNull("propensity"), Eq("position", 3)),
    ]  # fmt: skip
    for predicate in predicates:
        test = predicate.to_python()
        in_python = [e["event_id"] for e in events if test(e)]
        rows = chdb.query(
            f"SELECT event_id FROM {relation} WHERE {predicate.to_sql()} ORDER BY event_time", "CSV"
        )
        assert in_python == [line.strip('"') for line in str(rows).split()], predicate


def values_at(fs: FeatureSet, relation: str, points: list[tuple[str, int]], tmp_path: Path) -> Rows:
    """The ClickHouse evaluation of every window at arbitrary (entity, time) points."""
    path = tmp_path / f"points-{fs.name}.parquet"
    pq.write_table(pa.table({"entity_key": [k for k, _ in points], "at": [t for _, t in points]}), path)
    frame = chdb.query(values_at_sql(fs, relation, f"file('{path}', Parquet)"), "DataFrame")
    rows: Rows = {}
    for record in frame.to_dict("records"):
        key = (record.pop("entity_key"), int(record.pop("at")))
        rows[key] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
    return rows


def read_at(fs: FeatureSet, updates: list[dict[str, Any]], points: list[tuple[str, int]]) -> Rows:
    """What an online read at each point returns: the entity's latest update up to then, its
    windows evaluated from its tiles at the point's time (nothing before its first update)."""
    latest: dict[str, list[dict[str, Any]]] = {}
    for u in sorted(updates, key=lambda u: u["event_time"]):  # stable: the last emitted per time wins
        latest.setdefault(u["entity_key"], []).append(u)
    out: Rows = {}
    for key, t in points:
        seen = [u for u in latest.get(key, []) if u["event_time"] <= t]
        out[(key, t)] = evaluate_tiles(seen[-1]["tiles"], t)[0] if seen else None  # type: ignore[assignment]
    return out


@pytest.mark.parametrize("fs", [FS, user_activity, item_activity], ids=lambda fs: fs.name)
def test_windows_read_at_random_times_agree_in_sql_the_stream_and_the_oracle(
    fs: FeatureSet, clicks: list[Any], tmp_path: Path
) -> None:
    """Every aggregation kind read at random times between events and long after them: the tiles an
    online read evaluates, the ClickHouse evaluation over raw events and a brute-force reading agree."""
    rng = random.Random(13)
    if fs is FS:  # every aggregation kind, with nulls, filters and out-of-order arrivals
        events = [
            click(BASE + rng.randint(0, 3 * 3_600_000), user=f"u{rng.randint(1, 4)}",
                  item=rng.choice("abcdef"), action=rng.choice(["IMPRESSION", "CLICK"]),
                  position=rng.randint(1, 3), propensity=rng.choice([None, 0.1, 0.25, 1 / 3]),
                  event_id=f"e{i}")
            for i in range(500)
        ]  # fmt: skip
        arrivals = sorted(
            events, key=lambda e: e["event_time"] + (rng.randint(0, 50_000) if rng.random() < 0.2 else 0)
        )
    else:
        events = arrivals = clicks[:4000]
    relation = write_parquet(events, tmp_path / f"{fs.name}.parquet")
    agg = Aggregator(fs)
    updates = [u for e in arrivals for u in agg.apply(e, write_time=0)]
    kept = accepted(fs, arrivals)
    assert len(kept) == len(events)  # nothing too late here: the SQL counts every event
    by_entity: dict[str, list[dict[str, Any]]] = {}
    for e in kept:
        by_entity.setdefault(str(e[fs.entity]), []).append(e)
    first = {k: min(e["event_time"] for e in v) for k, v in by_entity.items()}
    last = {k: max(e["event_time"] for e in v) for k, v in by_entity.items()}
    entities = sorted(by_entity)
    points = []
    for _ in range(600):
        k = rng.choice(entities)
        points.append((k, rng.randint(first[k], last[k] + fs.max_window_ms + 3_600_000)))
    sql, online = values_at(fs, relation, points, tmp_path), read_at(fs, updates, points)
    oracle = {(k, t): oracle_values_at(fs, by_entity[k], t) for k, t in points}
    assert same(sql, oracle), "ClickHouse and the brute force differ"
    assert same(online, oracle), "the tiles an online read evaluates and the brute force differ"
    assert any(v[fs.features[0].name] for v in oracle.values())  # not all empty windows


def test_a_duplicated_event_counts_once_in_the_stream_and_the_backfill(tmp_path: Path) -> None:
    rng = random.Random(17)
    events = sorted(
        (click(BASE + rng.randint(0, 3_600_000), user=f"u{rng.randint(1, 3)}", item=rng.choice("abc"),
               action=rng.choice(["IMPRESSION", "CLICK"]), position=rng.randint(1, 3), event_id=f"e{i}")
         for i in range(300)),
        key=lambda e: e["event_time"],
    )  # fmt: skip
    # Client retries: the same event published again a few events later (within the lateness),
    # and one long after (beyond it: too late, so not counted either).
    retried = list(events)
    for e in rng.sample(events[:-40], 60):
        retried.insert(retried.index(e) + rng.randint(1, 3), dict(e))
    retried.append(dict(events[0]))
    relation = write_parquet(retried, tmp_path / "retried.parquet")
    agg = Aggregator(FS)
    updates, rejected = [], []
    for e in retried:
        try:
            updates += agg.apply(e, write_time=0)
        except EventRejected as exc:
            rejected.append(exc.reason)
    assert rejected == ["duplicate"] * 60 + ["too_late"]
    once = expected(FS, events)
    assert same(last_updates(updates), once)
    assert same(backfill(FS, relation), once)


@pytest.mark.parametrize("fs", [FS, user_activity, item_activity], ids=lambda fs: fs.name)
def test_backfilled_rows_carry_the_streams_tiles(fs: FeatureSet, clicks: list[Any], tmp_path: Path) -> None:
    rng = random.Random(21)
    if fs is FS:
        events = sorted(
            (click(BASE + rng.randint(0, 2 * 3_600_000), user=f"u{rng.randint(1, 3)}",
                   item=rng.choice("abcd"), action=rng.choice(["IMPRESSION", "CLICK"]),
                   position=rng.randint(1, 3), propensity=rng.choice([None, 0.1, 0.25]), event_id=f"e{i}")
             for i in range(400)),
            key=lambda e: e["event_time"],
        )  # fmt: skip
    else:
        events = clicks[:5000]
    relation = write_parquet(events, tmp_path / f"tiles-{fs.name}.parquet")
    rows = chdb.query(backfill_sql(fs, relation, 0, 2**62, own=True), "ArrowTable")
    windows = len({f.window_ms for f in fs.features})
    tiles = [chdb.query(tiles_sql(fs, relation, 0, 2**62, w), "ArrowTable") for w in range(windows)]
    blobs, valid = backfill_tiles(fs, rows, tiles)
    agg = Aggregator(fs)
    streamed = {(u["entity_key"], u["event_time"]): u for e in events for u in agg.apply(e, write_time=0)}
    keys = list(
        zip(rows.column("entity_key").to_pylist(), rows.column("event_time").to_pylist(), strict=True)
    )
    assert len(keys) == len(streamed)
    for key, blob, until in zip(keys, blobs, valid, strict=True):
        assert until == streamed[key]["valid_until"] and same_tiles(blob, streamed[key]["tiles"]), key
