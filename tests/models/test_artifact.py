"""Artifacts: deterministic skops bytes, round trips, and refusal of anything outside the allowlist."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
import skops.io as sio

from features.repository import FeatureRepository
from models.artifact import FORMAT, TRUSTED_TYPES, ArtifactError, dump_pipeline, load_pipeline
from models.estimators import ESTIMATORS, make_estimator
from models.pipeline import ModelPipeline, records
from models.spec import ModelSpec


class Sneaky:
    """Stands for any class a crafted file could name to get code run at load time."""

    def __init__(self) -> None:
        self.payload = "rm -rf /"


@pytest.fixture(scope="module")
def fitted(
    example_specs: dict[str, ModelSpec], repository: FeatureRepository, small_frame: pd.DataFrame
) -> ModelPipeline:
    spec = example_specs["ctr_model"].model_copy(update={"params": {"max_iter": 20, "max_depth": 3}})
    return ModelPipeline(spec, repository).fit(small_frame)


def test_round_trip_rebinds_transforms_and_scores_the_same(
    fitted: ModelPipeline, repository: FeatureRepository, small_frame: pd.DataFrame
) -> None:
    data = dump_pipeline(fitted)
    loaded = load_pipeline(data, repository)
    assert loaded.spec == fitted.spec and loaded.columns == fitted.columns and loaded.params == fitted.params
    rows = records(small_frame.head(200))
    x, missing = loaded.assemble(rows)  # on-demand item_ctr bound again from the repository
    assert np.array_equal(x, fitted.assemble(rows)[0]) and missing == fitted.assemble(rows)[1]
    assert np.array_equal(loaded.scores(x), fitted.scores(x))
    assert dump_pipeline(loaded) == data  # a loaded model saves to the same bytes


def test_bytes_are_deterministic(
    fitted: ModelPipeline, small_frame: pd.DataFrame, repository: FeatureRepository
) -> None:
    refit = ModelPipeline(fitted.spec, repository).fit(small_frame)
    first, second = dump_pipeline(fitted), dump_pipeline(refit)
    assert first == second
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        infos = archive.infolist()
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)


def test_untrusted_types_are_refused(fitted: ModelPipeline, repository: FeatureRepository) -> None:
    crafted = sio.dumps({"format": FORMAT, "estimator": Sneaky()})
    with pytest.raises(ArtifactError, match=r"untrusted types tests\.models\.test_artifact\.Sneaky"):
        load_pipeline(crafted, repository)
    with pytest.raises(ArtifactError, match="not a Headwater model artifact"):
        load_pipeline(b"PK\x03\x04 not a zip", repository)
    with pytest.raises(ArtifactError, match="expected format"):
        load_pipeline(sio.dumps({"format": "other", "estimator": None}), repository)


def test_the_allowlist_covers_every_estimator_and_nothing_more() -> None:
    x = np.random.default_rng(0).normal(size=(200, 3))
    y = (x[:, 0] > 0).astype(int)
    needed: set[str] = set()
    for name, kind in ESTIMATORS.items():
        for task in kind.tasks:
            quick = {"hist_gradient_boosting": {"max_iter": 2}, "random_forest": {"n_estimators": 2}}.get(
                name, {}
            )
            estimator = make_estimator(name, task, quick)
            if task == "clustering":
                estimator.fit(x)  # type: ignore[attr-defined]
            else:
                estimator.fit(x, y if task == "classification" else x[:, 1])  # type: ignore[attr-defined]
            needed |= set(sio.get_untrusted_types(data=sio.dumps(estimator)))
    assert needed == TRUSTED_TYPES
