"""One feature definition, one meaning: the stream through the broker equals the ClickHouse backfill.

The real clickstream goes through the embedded broker, the feature processors and the lake
sink; the backfill SQL then runs over the archived raw clicks in the offline store. Every
value at every update time must agree. The same run then checks historical retrieval.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import pandas as pd
import pytest

from batch.offline_store import open_offline_store
from features.examples.clickstream import item_ctr
from features.sql import backfill_sql
from headwater.sample_data import merged_events
from headwater.sdk import FeatureStore
from headwater.settings import Settings
from processors.worker import load_repository, run_processors
from streams.consumer import EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde

Key = tuple[str, str, int]  # feature set, entity, event time


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
    with EventConsumer(settings, serde, ["feature-updates"]) as consumer:
        while True:
            batch = consumer.poll(5000, 0.2)
            for e in batch:  # log order per key: the last update at a time holds all its events
                r = e.record
                values[(r["feature_set"], r["entity_key"], r["event_time"])] = r["values"]
            if not batch and consumer.caught_up():
                break
    outcomes = [r for t, r in events if t == "outcomes"]
    return settings, values, outcomes


def test_stream_equals_backfill_at_every_update_time(
    streamed: tuple[Settings, dict[Key, dict[str, Any]], list[dict[str, Any]]],
) -> None:
    settings, stream, _ = streamed
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
    streamed: tuple[Settings, dict[Key, dict[str, Any]], list[dict[str, Any]]],
) -> None:
    settings, stream, outcomes = streamed
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
        times = [k[2] for k in stream if k[0] == fs and k[1] == entity and k[2] <= t]
        return stream[(fs, entity, max(times))][name] if times else None

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
