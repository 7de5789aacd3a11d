"""Fixtures of the Dagster tests: the real sample clickstream in a lake, settings for a daily run.

The sample (ZOZOTOWN Open Bandit Dataset, 2019-11-24 .. 2019-11-30) is archived once per
session with the lake sink's ``LakeWriter``, then copied into each test's data directory,
on the session's real broker (the ``settings`` fixture: fresh topic prefix and data dir).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from headwater.sample_data import merged_events
from headwater.settings import Settings, load_settings
from processors.lake import LakeWriter
from streams.catalog import SchemaCatalog

# Small and fast: two days of look-back, a tiny search space (tests/batch/specs.py).
BATCH = {
    "model_specs": "tests.batch.specs:specs",
    "training_lookback_days": 1,
    "min_positives": 3,
}


@pytest.fixture(scope="session")
def sample_clicks() -> list[dict[str, Any]]:
    return [record for topic, record in merged_events() if topic == "clicks"]


@pytest.fixture(scope="session")
def clicks_lake(sample_clicks: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's click events archived as the sink archives them: three partitions."""
    settings = load_settings(data_dir=tmp_path_factory.mktemp("batch-lake"))
    LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir)).write(
        "clicks", [(i % 3, i // 3, record) for i, record in enumerate(sample_clicks)]
    )
    return settings.lake_dir / "clicks"


def batch_settings_of(settings: Settings, **batch: Any) -> Settings:
    return settings.model_copy(update={"batch": settings.batch.model_copy(update={**BATCH, **batch})})


@pytest.fixture()
def batch_settings(settings: Settings, clicks_lake: Path) -> Settings:
    """Per-test settings on the real broker, with the sample's clicks in the lake."""
    shutil.copytree(clicks_lake, settings.lake_dir / "clicks")
    return batch_settings_of(settings)
