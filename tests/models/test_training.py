"""Labels from the offline store, point-in-time frames, and reproducible training."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pandas as pd
import pytest

from features.repository import FeatureRepository
from headwater.errors import HeadwaterError
from models.artifact import load_pipeline
from models.spec import ModelSpec
from models.training import data_hash, train


def test_labels_are_impressions_with_their_clicks(labels: pd.DataFrame, clicks: list[dict[str, Any]]) -> None:
    impressions = [c for c in clicks if c["action"] == "IMPRESSION"]
    clicked = {
        (c["user_id"], c["item_id"], c["position"], c["event_time"]) for c in clicks if c["action"] == "CLICK"
    }
    assert len(labels) == len(impressions) == 30_000
    assert int(labels["clicked"].sum()) == len(clicked) == 130
    assert (labels["label_time"] == labels["event_time"] - 1).all()
    assert labels["event_time"].is_monotonic_increasing
    got = {
        (u, i, p, t)
        for u, i, p, t, c in labels[["user_id", "item_id", "position", "event_time", "clicked"]].itertuples(
            index=False
        )
        if c
    }
    assert got == clicked


def test_features_never_see_the_labelled_impression(
    frame: pd.DataFrame, clicks: list[dict[str, Any]]
) -> None:
    # A user's clicks_7d at label time counts only clicks strictly before the impression.
    clicked = frame.loc[frame["clicked"] == 1, ["user_id", "event_time", "user_activity:clicks_7d"]]
    for user, t, value in clicked.head(40).itertuples(index=False, name=None):
        before = Counter(
            c["action"] for c in clicks if c["user_id"] == user and t - 7 * 86_400_000 < c["event_time"] < t
        )
        assert (0 if pd.isna(value) else int(value)) == before["CLICK"]  # its own click is not counted


def test_training_twice_gives_the_same_model_hash(
    example_specs: dict[str, ModelSpec], repository: FeatureRepository, frame: pd.DataFrame
) -> None:
    spec = example_specs["ctr_model"]
    first = train(spec, repository, frame)
    shuffled = frame.sample(frac=1.0, random_state=1)  # row order is not part of the data
    second = train(spec, repository, shuffled)
    assert first.sha256 == second.sha256 == hashlib.sha256(first.artifact).hexdigest()
    assert first.data_hash == second.data_hash and first.metrics == second.metrics
    assert first.rows == 30_000 and first.train_rows == 24_000 and len(first.holdout) == 6_000
    assert first.holdout["label_time"].min() >= frame["label_time"].quantile(0.79)  # the latest rows
    assert set(first.metrics) == {"roc_auc", "average_precision", "log_loss", "accuracy"}
    assert 0.0 <= first.metrics["roc_auc"] <= 1.0
    stats = first.feature_stats["user_activity:clicks_7d"]
    assert stats["count"] == 24_000 and 0.0 <= stats["missing_share"] < 1.0 and stats["p50"] <= stats["p99"]
    assert set(first.feature_stats) == set(first.pipeline.columns)
    assert {"scikit-learn", "numpy", "river", "skops", "headwater"} <= set(first.package_versions)
    assert first.code_version
    loaded = load_pipeline(first.artifact, repository)
    assert loaded.evaluate(first.holdout) == first.metrics


def test_tuned_training_records_the_search(
    example_specs: dict[str, ModelSpec], repository: FeatureRepository, frame: pd.DataFrame
) -> None:
    spec = example_specs["ctr_linear"]
    trained = train(spec, repository, frame)
    assert len(trained.search_trials) == 5 and "C" in trained.params
    assert trained.pipeline.params == trained.params
    assert train(spec, repository, frame).sha256 == trained.sha256


def test_the_data_hash_sees_any_change(frame: pd.DataFrame) -> None:
    head = frame.head(500).reset_index(drop=True)
    changed = head.copy()
    changed.loc[3, "clicked"] = 1 - changed.loc[3, "clicked"]
    assert data_hash(head) == data_hash(head.copy()) != data_hash(changed)


def test_bad_frames_fail_with_a_message(
    example_specs: dict[str, ModelSpec], repository: FeatureRepository, frame: pd.DataFrame
) -> None:
    spec = example_specs["ctr_model"]
    with pytest.raises(HeadwaterError, match="empty"):
        train(spec, repository, frame.head(0))
    with pytest.raises(HeadwaterError, match="both classes"):
        train(spec, repository, frame[frame["clicked"] == 0].head(100))
