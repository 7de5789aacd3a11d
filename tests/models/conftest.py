"""The real clickstream sample, archived in a lake and backfilled, once per session.

Training frames come from the real path: impressions -> ``build_labels`` over the offline
store -> ``training_frame`` (point-in-time features through the SDK). The backfill writes
every value at backfill time, so frames use the event-time view (``bitemporal=False``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from batch.backfill import backfill
from batch.offline_store import open_offline_store
from features.examples.clickstream import repository as clickstream_repository
from features.repository import FeatureRepository
from headwater.sample_data import merged_events
from headwater.settings import Settings, load_settings
from models.examples.clickstream import specs
from models.spec import ModelSpec
from models.training import build_labels, training_frame
from processors.lake import LakeWriter
from streams.catalog import SchemaCatalog


@pytest.fixture(scope="session")
def clicks() -> list[dict[str, Any]]:
    return [record for topic, record in merged_events() if topic == "clicks"]


@pytest.fixture(scope="session")
def lake(clicks: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = load_settings(data_dir=Path(tmp_path_factory.mktemp("models-lake")))
    LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir)).write(
        "clicks", [(i % 3, i // 3, record) for i, record in enumerate(clicks)]
    )
    for feature_set in ("user_activity", "item_activity"):
        backfill(settings, feature_set, 0, 2**45)
    return settings


@pytest.fixture(scope="session")
def repository() -> FeatureRepository:
    return clickstream_repository()


@pytest.fixture(scope="session")
def example_specs() -> dict[str, ModelSpec]:
    return {s.name: s for s in specs()}


@pytest.fixture(scope="session")
def labels(lake: Settings) -> pd.DataFrame:
    with open_offline_store(lake) as store:
        return build_labels(store, 0, 2**45)


@pytest.fixture(scope="session")
def frame(lake: Settings, example_specs: dict[str, ModelSpec], labels: pd.DataFrame) -> pd.DataFrame:
    """The full training frame of ctr_model (whose features cover ctr_linear's): 30,000 impressions."""
    return training_frame(lake, example_specs["ctr_model"], labels, bitemporal=False)


@pytest.fixture(scope="session")
def small_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Every clicked row plus the first 3,000 others, in time order: quick fits with both classes."""
    keep = frame[(frame["clicked"] == 1) | (frame.index < 3_000)]
    return keep.sort_values("label_time", kind="mergesort").reset_index(drop=True)
