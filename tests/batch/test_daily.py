"""The daily Dagster graph, in-process, on the real sample: real chdb, LMDB, broker and registry.

One daily story: a backfill of three days as one run (range), then the next day's run, then
that day again (same model hash, no new registry version); and the bad days: an empty
partition and a malformed one stop at their checks with a message saying what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
from dagster import AssetKey, DagsterInstance, ExecuteInProcessResult

from batch.assets import Warehouse, daily_assets, materialize_days
from batch.assets.common import day_bounds
from batch.assets.predictions import PREDICTIONS, predictions_feature_set
from batch.offline_store import open_offline_store
from headwater.settings import Settings
from processors.lake import LakeWriter
from registry import Registry
from serving.online_store import open_online_store
from streams.catalog import SchemaCatalog

MODEL = "ctr_model"
MODELS = (MODEL, "ctr_linear")  # tests/batch/specs.py
DAYS = ("2019-11-24", "2019-11-25", "2019-11-26", "2019-11-27")


def run(
    settings: Settings,
    *,
    partition: str | None = None,
    first: str | None = None,
    last: str | None = None,
    instance: DagsterInstance | None = None,
) -> ExecuteInProcessResult:
    """Materialize every asset (and check) for a day, or for a range of days as one run."""
    day = partition or first
    assert day is not None
    return materialize_days(settings, day, last, instance=instance)


def materialized(result: ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Asset key -> metadata values of its materialization in the run."""
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
        if e.asset_key is not None
    }


def checks(result: ExecuteInProcessResult) -> dict[str, tuple[bool, str]]:
    return {
        f"{e.asset_key.to_user_string()}:{e.check_name}": (e.passed, e.description or "")
        for e in result.get_asset_check_evaluations()
    }


def sample_counts(clicks: Sequence[dict[str, Any]], day: str) -> tuple[int, set[str], set[str]]:
    start, end = day_bounds(day)
    of_day = [c for c in clicks if start <= c["event_time"] < end]
    return len(of_day), {c["user_id"] for c in of_day}, {c["item_id"] for c in of_day}


def test_daily_runs_train_register_and_batch_score(
    batch_settings: Settings, sample_clicks: list[dict[str, Any]]
) -> None:
    settings, warehouse = batch_settings, Warehouse(batch_settings)
    instance = DagsterInstance.ephemeral()

    # A backfill of four days is one run: raw events and features of each day, one model
    # trained on the range and its look-back day (2019-11-23, before the sample: no rows).
    backfill = run(settings, first="2019-11-24", last="2019-11-27", instance=instance)
    assert backfill.success, checks(backfill)
    assert all(passed for passed, _ in checks(backfill).values()), checks(backfill)
    got = materialized(backfill)
    stages = ("training_set", "model", "evaluation", "registered_model", "batch_predictions")
    assert set(got) == {"raw_clicks", "feature_values", *(f"{m}/{s}" for m in MODELS for s in stages)}
    for day in DAYS:
        events = pd.read_parquet(warehouse.path("raw_clicks", day))
        assert len(events) == sample_counts(sample_clicks, day)[0] and events["event_id"].is_unique
    assert got[f"{MODEL}/training_set"]["window"] == "2019-11-23 .. 2019-11-27"
    training = pd.read_parquet(warehouse.path("training_sets", "2019-11-24..2019-11-27", model=MODEL))
    impressions = sum(
        1 for c in sample_clicks if c["action"] == "IMPRESSION" and "2019-11-24" <= _day(c) <= "2019-11-27"
    )
    assert len(training) == got[f"{MODEL}/training_set"]["rows"] == impressions
    first = got[f"{MODEL}/registered_model"]
    assert (first["version"], first["production_version"], first["promoted"]) == (1, 1, True)
    assert got[f"{MODEL}/model"]["sha256"] == first["sha256"]

    # The registry event went through the real broker's models topic: a fresh reader sees it.
    with Registry(settings, actor="test") as registry:
        production = registry.resolve(f"{MODEL}@production")
        assert production.version == 1 and production.artifact_sha256 == first["sha256"]
        assert registry.resolve(f"{MODEL}@staging").version == 1
        lineage = registry.trained_on(MODEL, 1)
    data = lineage["training_data"]
    assert (data["start_ms"], data["end_ms"]) == (day_bounds("2019-11-23")[0], day_bounds("2019-11-27")[1])
    assert data["rows"] <= impressions and data["data_hash"]
    assert production.metadata["holdout_sha256"] and production.metadata["spec"]["name"] == MODEL

    # Batch predictions: every user of each day, ranked items, in the online store and the warehouse.
    _, users, items = sample_counts(sample_clicks, "2019-11-27")
    end = day_bounds("2019-11-27")[1]
    with open_online_store(settings) as store:
        rows = store.get_batch(
            predictions_feature_set(MODEL),
            sorted(users),
            ["score", "ranked_items", "model_version"],
            now_ms=end,
        )
    assert all(r.event_time_ms == end for r in rows)
    for r in rows:
        ranked, score = json.loads(str(r.values["ranked_items"])), r.values["score"]
        assert r.values["model_version"] == 1 and isinstance(score, float) and 0 <= score <= 1
        assert len(ranked) == 10 and set(ranked) <= items and len(set(ranked)) == 10
    with open_offline_store(settings) as offline:
        per_day = offline.query_df(
            f"SELECT toDate(fromUnixTimestamp64Milli(event_time - 1)) AS day, count() AS users, "
            f"uniqExact(user_id) AS distinct_users, any(model_version) AS version "
            f"FROM {warehouse.relation(PREDICTIONS, model=MODEL)} GROUP BY day ORDER BY day"
        )
    assert per_day["day"].astype(str).tolist() == list(DAYS)
    assert per_day["users"].tolist() == [len(sample_counts(sample_clicks, d)[1]) for d in DAYS]
    assert (per_day["users"] == per_day["distinct_users"]).all() and set(per_day["version"]) == {1}

    # The next day's scheduled run: a new candidate, registered, and through the gate or not.
    daily = run(settings, partition="2019-11-28", instance=instance)
    assert daily.success, checks(daily)
    second = materialized(daily)[f"{MODEL}/registered_model"]
    assert second["version"] == 2
    evaluation = materialized(daily)[f"{MODEL}/evaluation"]
    assert evaluation["production_version"] == 1 and "candidate roc_auc" in evaluation
    assert "production roc_auc" in evaluation  # both on the candidate's holdout
    if second["promoted"]:
        assert second["production_version"] == 2
    else:  # a refusal is reported, not a failure
        assert second["production_version"] == 1 and "refused" in second["gate"]

    # The same day again: the same artifact, no new version, no alias move.
    with Registry(settings, actor="test") as registry, registry.view() as state:
        before = [(v.version, v.artifact_sha256) for v in state.versions(MODEL)]
        production_before = state.alias(MODEL, "production")
    again = run(settings, partition="2019-11-28")
    assert again.success, checks(again)
    repeat = materialized(again)
    assert repeat[f"{MODEL}/model"]["sha256"] == second["sha256"]
    assert repeat[f"{MODEL}/registered_model"]["version"] == 2
    with Registry(settings, actor="test") as registry, registry.view() as state:
        assert [(v.version, v.artifact_sha256) for v in state.versions(MODEL)] == before
        assert state.alias(MODEL, "production") == production_before


def _day(click: dict[str, Any]) -> str:
    return pd.Timestamp(click["event_time"], unit="ms", tz="UTC").strftime("%Y-%m-%d")


def test_an_empty_partition_stops_at_its_check_with_the_reason(batch_settings: Settings) -> None:
    result = run(batch_settings, partition="2019-12-05")
    assert not result.success
    passed, message = checks(result)["raw_clicks:rows"]
    assert not passed
    assert message.startswith("partition 2019-12-05 has 0 click events in the lake")
    assert "is the lake sink running?" in message
    # Blocking: nothing downstream of the bad day was computed.
    assert set(materialized(result)) == {"raw_clicks"}
    assert not Warehouse(batch_settings).path("training_sets", "2019-12-05", model=MODEL).exists()


def test_a_malformed_partition_stops_at_its_check(
    batch_settings: Settings, sample_clicks: list[dict[str, Any]]
) -> None:
    # A producer bug: the day's events lost their user ids.
    shift = day_bounds("2019-12-06")[0] - day_bounds("2019-11-24")[0]
    broken = [
        {**c, "event_id": f"broken-{i}", "event_time": c["event_time"] + shift, "user_id": ""}
        for i, c in enumerate(sample_clicks[:200])
    ]
    LakeWriter(batch_settings, SchemaCatalog.load(batch_settings.schemas_dir)).write(
        "clicks", [(0, 10**9 + i, r) for i, r in enumerate(broken)]
    )
    result = run(batch_settings, partition="2019-12-06")
    assert not result.success
    passed, message = checks(result)["raw_clicks:missing_values"]
    assert not passed
    assert message == (
        "partition 2019-12-06: 100.0% of 200 click events have no user_id (limit 1.0%): "
        "the producer sends malformed events"
    )
    assert checks(result)["raw_clicks:rows"][0]  # the day is not empty, it is wrong
    assert set(materialized(result)) == {"raw_clicks"}


def test_every_asset_key_is_defined(batch_settings: Settings) -> None:
    assets, asset_checks = daily_assets(batch_settings)
    keys = {k.to_user_string() for a in assets for k in a.keys}
    assert {"raw_clicks", "feature_values", f"{MODEL}/training_set", f"{MODEL}/batch_predictions"} <= keys
    check_keys = {f"{k.asset_key.to_user_string()}:{k.name}" for c in asset_checks for k in c.check_keys}
    assert check_keys == {
        "raw_clicks:rows", "raw_clicks:missing_values", "raw_clicks:freshness",
        *(f"{m}/training_set:{n}" for m in MODELS for n in ("rows", "missing_values",
                                                                            "label_balance")),
    }  # fmt: skip
    assert AssetKey([MODEL, "model"]) in {k for a in assets for k in a.keys}
