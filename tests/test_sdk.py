"""The feature SDK's online retrieval against a real LMDB online store."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.examples.clickstream import POSITION_FACTOR, item_ctr, repository
from headwater.errors import HeadwaterError, NotFoundError
from headwater.sdk import FeatureStore
from headwater.settings import load_settings

T0 = 1_700_000_000_000


@pytest.fixture()
def store(tmp_path: Path) -> FeatureStore:
    fs = FeatureStore(load_settings(data_dir=tmp_path), repository())
    fs.online_store.put_batch(
        "user_activity",
        [("u1", T0, {"clicks_7d": 3, "impressions_24h": 40}), ("u2", T0 - 5_000, {"clicks_7d": 0})],
    )
    fs.online_store.put_batch(
        "item_activity", [("14", T0 - 60_000, {"clicks_24h": 2, "impressions_24h": 90})]
    )
    return fs


def test_online_features_with_freshness_and_missing_values(store: FeatureStore) -> None:
    refs = ["user_activity:clicks_7d", "item_activity:clicks_24h"]
    got = store.get_online_features(
        refs, [{"user_id": "u1", "item_id": "14"}, {"user_id": "u2", "item_id": "nope"}], now_ms=T0
    )
    assert got.rows == [
        {"user_activity:clicks_7d": 3, "item_activity:clicks_24h": 2},
        {"user_activity:clicks_7d": 0, "item_activity:clicks_24h": None},
    ]
    assert got.freshness_ms == [60_000, 5_000]  # the oldest stored feature used by each row
    assert got.missing == [[], ["item_activity:clicks_24h"]]


def test_on_demand_transform_is_the_declared_function(store: FeatureStore) -> None:
    got = store.get_online_features(
        ["item_ctr:ctr_at_position", "item_ctr:ctr_smoothed"], [{"item_id": "14", "position": 2}], now_ms=T0
    )
    expected = item_ctr(clicks_24h=2, impressions_24h=90, position=2)
    assert got.rows == [
        {
            "item_ctr:ctr_at_position": expected["ctr_at_position"],
            "item_ctr:ctr_smoothed": expected["ctr_smoothed"],
        }
    ]
    assert expected["ctr_at_position"] == pytest.approx(expected["ctr_smoothed"] * POSITION_FACTOR[2])


def test_bad_requests_name_the_problem(store: FeatureStore) -> None:
    with pytest.raises(NotFoundError, match=r"unknown feature refs 'user_activity:nope'.*known:"):
        store.get_online_features(["user_activity:nope"], [{"user_id": "u1"}])
    with pytest.raises(HeadwaterError, match="entity row 0 has no 'user_id'"):
        store.get_online_features(["user_activity:clicks_7d"], [{"item_id": "14"}])
    with pytest.raises(NotFoundError, match="needs input 'position'"):
        store.get_online_features(["item_ctr:ctr_smoothed"], [{"item_id": "14"}])
