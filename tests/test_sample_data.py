"""The Open Bandit sample turned into events: the mapping on real rows, order, schema fit."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from headwater.errors import NotFoundError
from headwater.sample_data import (
    CAMPAIGNS,
    iter_events,
    iter_rows,
    merged_events,
    row_events,
    sample_data_dir,
    user_id,
)
from streams.serde import Serde


def test_the_project_carries_every_campaign() -> None:
    folder = sample_data_dir()
    for campaign in CAMPAIGNS:
        assert (folder / campaign / f"{campaign}.csv.gz").is_file()
        assert (folder / campaign / "item_context.csv.gz").is_file()
    assert (folder.parent / "README.md").read_text().count("Apache") >= 1


def test_user_id_is_a_hash_of_the_four_user_features() -> None:
    row = next(iter_rows("all"))
    features = [row[f"user_feature_{i}"] for i in range(4)]
    expected = hashlib.sha1("|".join(features).encode()).hexdigest()[:16]
    assert user_id(row) == expected
    assert row_events("all", row)[0][1]["user_id"] == expected


def test_an_unclicked_row_is_one_impression() -> None:
    row = next(iter_rows("all"))  # 2019-11-24 00:00:34.762830 UTC, item 14 at position 3, no click
    assert row["click"] == "0"
    events = row_events("all", row)
    assert len(events) == 1
    topic, record = events[0]
    assert topic == "clicks"
    assert record["event_id"] == "obd-all-0"
    assert record["event_time"] == int(datetime(2019, 11, 24, 0, 0, 34, 762000, UTC).timestamp() * 1000)
    assert record["event_time"] == 1_574_553_634_762
    assert record["item_id"] == "14"
    assert record["position"] == 3
    assert record["action"] == "IMPRESSION"
    assert record["campaign"] == "all"
    assert record["propensity"] == pytest.approx(0.0125)
    assert record["user_features"] == {f"user_feature_{i}": row[f"user_feature_{i}"] for i in range(4)}


def test_a_clicked_row_also_yields_a_click_and_an_outcome() -> None:
    row = next(r for r in iter_rows("men") if r["click"] == "1")
    (t1, impression), (t2, click), (t3, outcome) = row_events("men", row)
    assert (t1, t2, t3) == ("clicks", "clicks", "outcomes")
    base = f"obd-men-{row['']}"
    assert impression["event_id"] == base and impression["action"] == "IMPRESSION"
    assert click["event_id"] == f"{base}-click" and click["action"] == "CLICK"
    assert {k: v for k, v in click.items() if k not in ("event_id", "action")} == {
        k: v for k, v in impression.items() if k not in ("event_id", "action")
    }
    assert outcome["entity_key"] == impression["user_id"] == user_id(row)
    assert outcome["item_id"] == impression["item_id"] == str(int(row["item_id"]))
    assert outcome["outcome_type"] == "click" and outcome["value"] == 1.0
    assert outcome["event_time"] == impression["event_time"]


def test_a_campaign_is_in_event_time_order_with_one_click_and_outcome_per_clicked_row() -> None:
    rows = list(iter_rows("women"))
    events = list(iter_events("women"))
    times = [r["event_time"] for _, r in events]
    assert times == sorted(times)
    clicked = sum(r["click"] == "1" for r in rows)
    assert clicked > 0
    actions = [r.get("action") for t, r in events if t == "clicks"]
    assert actions.count("IMPRESSION") == len(rows)
    assert actions.count("CLICK") == clicked
    assert sum(t == "outcomes" for t, _ in events) == clicked
    assert len({r["event_id"] for _, r in events}) == len(events)


def test_merged_campaigns_interleave_in_event_time_order() -> None:
    events = list(merged_events(["men", "women"]))
    times = [r["event_time"] for _, r in events]
    assert times == sorted(times)
    assert {r["campaign"] for t, r in events if t == "clicks"} == {"men", "women"}


def test_every_event_fits_the_latest_schemas(serde: Serde) -> None:
    for topic, record in iter_events("all"):
        event_type = "click" if topic == "clicks" else "outcome"
        assert serde.decode(serde.encode(event_type, record)) == (event_type, record)


def test_unknown_campaign_and_missing_data_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="known: all, men, women"):
        next(iter_rows("kids"))
    with pytest.raises(NotFoundError, match="no Open Bandit sample data"):
        sample_data_dir(tmp_path)
