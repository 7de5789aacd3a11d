"""One feature definition, one meaning: the stream through the broker equals the ClickHouse backfill.

The real clickstream goes through the embedded broker, the feature processors and the lake
sink; the backfill SQL then runs over the archived raw clicks in the offline store. Every
value at every update time must agree. The same run then checks historical retrieval.
"""

from __future__ import annotations

import math
import random
import threading
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from batch.offline_store import open_offline_store
from features.engine import evaluate_tiles
from features.examples.clickstream import item_ctr
from features.sql import backfill_sql, values_at_sql
from headwater.sample_data import merged_events
from headwater.sdk import FeatureStore
from headwater.settings import Settings
from processors.worker import load_repository, run_processors
from streams.consumer import EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde

Key = tuple[str, str, int]  # feature set, entity, event time
# Settings, the last update's values per key, the outcomes, and the last update's tiles per key.
Streamed = tuple[Settings, dict[Key, dict[str, Any]], list[dict[str, Any]], dict[Key, bytes]]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return bool(a == b)


@pytest.fixture(scope="module")
def streamed(
    broker_settings: Settings, serde: Serde, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, dict[Key, dict[str, Any]], list[dict[str, Any]]]:
    settings = broker_settings.model_copy(
        update={"topic_prefix": "e2e.", "data_dir": tmp_path_factory.mktemp("e2e")}
    )
    from tests.conftest import create_topics

    create_topics(settings)
    events = list(merged_events())
    with EventProducer(settings, serde) as producer:
        for topic, record in events:
            producer.send(topic, record)
        producer.flush()
    names = [f"features-{fs.name}" for fs in load_repository(settings).feature_sets]
    run_processors(settings, names, threading.Event(), until_caught_up=True)
    run_processors(settings, ["lake-sink"], threading.Event(), until_caught_up=True)
    values: dict[Key, dict[str, Any]] = {}
    tiles: dict[Key, bytes] = {}
    with EventConsumer(settings, serde, ["feature-updates"]) as consumer:
        while True:
            batch = consumer.poll(5000, 0.2)
            for e in batch:  # log order per key: the last update at a time holds all its events
                r = e.record
                values[(r["feature_set"], r["entity_key"], r["event_time"])] = r["values"]
                tiles[(r["feature_set"], r["entity_key"], r["event_time"])] = r["tiles"]
            if not batch and consumer.caught_up():
                break
    outcomes = [r for t, r in events if t == "outcomes"]
    return settings, values, outcomes, tiles


def test_stream_equals_backfill_at_every_update_time(
    streamed: Streamed,
) -> None:
    settings, stream, _, _ = streamed
    repository = load_repository(settings)
    compared = 0
    with open_offline_store(settings) as store:
        for fs in repository.feature_sets:
            table = store.query(backfill_sql(fs, "clicks", 0, 2**62))
            names = [f.name for f in fs.features]
            backfill = {(fs.name, r["entity_key"], r["event_time"]): r for r in table.to_pylist()}
            streamed_keys = {k for k in stream if k[0] == fs.name}
            assert streamed_keys == set(backfill), f"{fs.name}: update times differ"
            for key in streamed_keys:
                for name in names:
                    assert same(stream[key][name], backfill[key][name]), (
                        key,
                        name,
                        stream[key][name],
                        backfill[key][name],
                    )
                compared += 1
    assert compared > 30_000  # every click event of both feature sets, not a sample


def test_historical_features_are_point_in_time_and_bitemporal(
    streamed: Streamed,
) -> None:
    settings, stream, outcomes, tiles = streamed
    labels = pd.DataFrame(
        {
            "user_id": [o["entity_key"] for o in outcomes],
            "item_id": [o["item_id"] for o in outcomes],
            "position": [2] * len(outcomes),
            "label_time": [o["event_time"] - 1 for o in outcomes],  # just before the click: no leak
            "label": [o["value"] for o in outcomes],
        }
    )
    refs = ["user_activity:clicks_7d", "item_activity:impressions_24h", "item_ctr:ctr_smoothed"]
    with FeatureStore(settings) as features:
        as_of_event_time = features.get_historical_features(labels, refs, bitemporal=False)
        bitemporal = features.get_historical_features(labels, refs)

    def expected(fs: str, entity: str, t: int, name: str) -> Any:
        """What an online read at t returned: the latest update then, its windows evaluated at t."""
        times = [k[2] for k in stream if k[0] == fs and k[1] == entity and k[2] <= t]
        return evaluate_tiles(tiles[(fs, entity, max(times))], t)[0][name] if times else None

    frame = as_of_event_time.astype(object).where(as_of_event_time.notna(), None)  # NaN: missing
    for row in frame.to_dict("records"):
        t = row["label_time"]
        assert row["user_activity:clicks_7d"] == expected("user_activity", row["user_id"], t, "clicks_7d")
        impressions = expected("item_activity", row["item_id"], t, "impressions_24h")
        assert row["item_activity:impressions_24h"] == impressions
        clicks = expected("item_activity", row["item_id"], t, "clicks_24h")
        smoothed = item_ctr(clicks_24h=clicks, impressions_24h=impressions, position=2)["ctr_smoothed"]
        assert row["item_ctr:ctr_smoothed"] == pytest.approx(smoothed)
    # The replay was written in 2026; in 2019 the platform had none of these values.
    assert bitemporal["user_activity:clicks_7d"].isna().all()
    assert list(bitemporal.columns) == [*labels.columns, *refs]


def test_online_reads_the_backfill_and_training_sets_agree_at_random_times(streamed: Streamed) -> None:
    """At random times between events and long after them: what an online read at that time
    returned (the stream's latest update then, evaluated from its tiles), ClickHouse's
    evaluation over the archived raw clicks, and a point-in-time training set with those label
    times hold the same values, for every feature of both feature sets."""
    settings, stream, _, tiles = streamed
    repository = load_repository(settings)
    rng = random.Random(29)
    with open_offline_store(settings) as store, FeatureStore(settings) as features:
        for fs in repository.feature_sets:
            mine = sorted(k for k in stream if k[0] == fs.name)
            times: dict[str, list[int]] = {}
            for _, entity, t in mine:
                times.setdefault(entity, []).append(t)
            points = []
            for entity in rng.sample(sorted(times), 40):
                for _ in range(5):
                    first, last = times[entity][0], times[entity][-1]
                    points.append((entity, rng.randint(first, last + fs.max_window_ms + 3_600_000)))
            online = {}
            for entity, t in points:
                latest = max(x for x in times[entity] if x <= t) if times[entity][0] <= t else None
                online[(entity, t)] = (
                    evaluate_tiles(tiles[(fs.name, entity, latest)], t)[0] if latest is not None else None
                )
            staged = pa.table({"entity_key": [e for e, _ in points], "at": [t for _, t in points]})
            name = f"_points_{fs.name}"
            relation = store.stage(staged, name)
            try:
                sql = {
                    (r["entity_key"], r["at"]): r
                    for r in store.query(values_at_sql(fs, "clicks", relation)).to_pylist()
                }
            finally:
                store.unstage(name)
            labels = pd.DataFrame({fs.entity: [e for e, _ in points], "label_time": [t for _, t in points]})
            refs = [f"{fs.name}:{f}" for f in fs.feature_names]
            training = features.get_historical_features(labels, refs, bitemporal=False)
            training = training.astype(object).where(training.notna(), None)
            for row in training.to_dict("records"):
                key = (row[fs.entity], row["label_time"])
                for f in fs.feature_names:
                    want = online[key][f] if online[key] is not None else None
                    assert same(row[f"{fs.name}:{f}"], want), (fs.name, key, f, "training", want)
                    if online[key] is not None:
                        assert same(sql[key][f], want), (fs.name, key, f, "ClickHouse", want)
