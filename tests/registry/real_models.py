"""Real Model Pipelines trained on the real clickstream sample, for the gate and CLI tests.

Labels are the sample's real impressions (clicked = a CLICK at the same ms); the one stored
feature, the item's click-through rate so far, is computed here point-in-time (only earlier
impressions count) so the tests need no backfill. The weak model sees the slot position
alone, the strong one also the item's CTR: both trained by ``models.training.train`` on the
same time-ordered split, so the candidate's holdout is the incumbent's too.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
import pytest

from features.repository import FeatureRepository
from headwater.sample_data import merged_events
from headwater.settings import load_settings
from models.spec import ModelSpec, PromotionPolicy
from models.training import TrainedModel, train
from processors.worker import load_repository
from registry import ModelVersion, Registry

RealModels = tuple[FeatureRepository, dict[str, tuple[ModelSpec, TrainedModel]]]

NAME = "ctr_small"


def _labels() -> pd.DataFrame:
    clicks = [r for topic, r in merged_events() if topic == "clicks"]
    clicked = {
        (r["user_id"], r["item_id"], r["position"], r["event_time"]) for r in clicks if r["action"] == "CLICK"
    }
    rows = [
        {
            "user_id": r["user_id"], "item_id": r["item_id"], "position": r["position"],
            "event_id": r["event_id"], "event_time": r["event_time"], "label_time": r["event_time"] - 1,
            "clicked": int((r["user_id"], r["item_id"], r["position"], r["event_time"]) in clicked),
        }
        for r in clicks if r["action"] == "IMPRESSION"
    ]  # fmt: skip
    frame = pd.DataFrame(rows).sort_values("event_time", kind="mergesort").reset_index(drop=True)
    by_item = frame.groupby("item_id")
    past_clicks = by_item["clicked"].cumsum() - frame["clicked"]
    frame["item_activity:ctr_7d"] = past_clicks / by_item.cumcount().clip(lower=1)
    return frame


def _spec(features: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        name=NAME, entity_keys=("user_id", "item_id"), features=features, request_features=("position",),
        label="clicked", task="classification", estimator="logistic_regression", metric="roc_auc",
        promotion=PromotionPolicy(metric="roc_auc", min_improvement=0.005, cooldown_s=0), owner="t",
    )  # fmt: skip


@pytest.fixture(scope="session")
def trained() -> RealModels:
    repository = load_repository(load_settings())
    frame = _labels()
    models = {}
    for kind, features in (("weak", ()), ("strong", ("item_activity:ctr_7d",))):
        spec = _spec(features)
        models[kind] = (spec, train(spec, repository, frame))
    return repository, models


def register_real(registry: Registry, spec: ModelSpec, model: TrainedModel) -> ModelVersion:
    buf = io.BytesIO()
    model.holdout.to_parquet(buf)
    uri, sha = registry.artifacts.put(buf.getvalue(), suffix=".parquet")
    metadata: dict[str, Any] = {
        "spec": spec.model_dump(mode="json"),
        "holdout_uri": uri,
        "holdout_sha256": sha,
    }
    return registry.register(NAME, model.artifact, feature_refs=list(spec.features), metrics=model.metrics,
                             metadata=metadata)  # fmt: skip
