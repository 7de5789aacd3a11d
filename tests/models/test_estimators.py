"""Every estimator trains and predicts on the real clickstream frame; the serving fast path equals it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from features.repository import FeatureRepository
from headwater.errors import ConfigError
from models.estimators import ESTIMATORS, RiverLogisticRegression, make_estimator
from models.fastpath import reference_scores
from models.metrics import METRICS, is_better
from models.pipeline import ModelPipeline, records
from models.spec import ModelSpec

FEATURES = (
    "user_activity:impressions_24h",
    "user_activity:clicks_7d",
    "user_activity:ctr_7d",
    "item_activity:ctr_24h",
    "item_activity:impressions_1h",
    "item_ctr:ctr_at_position",
)
QUICK: dict[str, dict[str, Any]] = {
    "hist_gradient_boosting": {"max_iter": 30, "max_depth": 4, "min_samples_leaf": 30},
    "random_forest": {"n_estimators": 20, "max_depth": 5},
    "kmeans": {"n_clusters": 4, "n_init": 2},
    "river_logistic_regression": {"epochs": 1},
    "river_linear_regression": {"epochs": 1},
}
CASES = [(name, task) for name, kind in ESTIMATORS.items() for task in sorted(kind.tasks)]


def spec_for(name: str, task: str) -> ModelSpec:
    label = {"classification": "clicked", "regression": "user_activity:impressions_7d"}.get(task, "clicked")
    metric = {"classification": "roc_auc", "regression": "rmse", "clustering": "silhouette"}[task]
    return ModelSpec(
        name=f"m_{name}",
        entity_keys=("user_id", "item_id"),
        features=FEATURES,
        request_features=("position",),
        label=label,
        task=task,  # type: ignore[arg-type]
        estimator=name,
        params=QUICK.get(name, {}),
        metric=metric,
        owner="t",
    )


@pytest.mark.parametrize(("name", "task"), CASES)
def test_each_estimator_trains_and_predicts_on_the_clickstream(
    name: str, task: str, small_frame: pd.DataFrame, repository: FeatureRepository
) -> None:
    frame = small_frame.copy()
    frame["user_activity:impressions_7d"] = frame["user_activity:impressions_7d"].fillna(0)
    spec = spec_for(name, task)
    pipeline = ModelPipeline(spec, repository).fit(frame)
    x, _ = pipeline.assemble(records(frame))
    assert pipeline.estimator is not None
    reference = reference_scores(pipeline.estimator, task, x)
    # The fast path computes the same numbers: one row at a time (serving) and in batches.
    singles = np.concatenate([pipeline.scores(x[i : i + 1]) for i in range(40)])
    np.testing.assert_allclose(singles, reference[:40], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pipeline.scores(x[:40]), reference[:40], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pipeline.scores(x), reference, rtol=1e-12, atol=1e-15)
    metrics = pipeline.evaluate(frame)
    assert spec.metric in metrics and not math.isnan(metrics[spec.metric])
    if task == "classification":
        assert ((reference >= 0) & (reference <= 1)).all() and metrics["roc_auc"] > 0.5  # learned something
        assert {p.label for p in pipeline.predict(records(frame.head(5)))} <= {"0", "1"}
    if task == "clustering":
        assert set(reference.astype(int)) == set(range(4))
        assert pipeline.predict(records(frame.head(1)))[0].score is None


def test_hist_gradient_boosting_fast_path_equals_predict_proba_exactly(
    frame: pd.DataFrame, repository: FeatureRepository, example_specs: dict[str, ModelSpec]
) -> None:
    spec = example_specs["ctr_model"].model_copy(update={"params": {"max_iter": 40, "max_depth": 5}})
    pipeline = ModelPipeline(spec, repository).fit(frame.iloc[:20_000])
    x, _ = pipeline.assemble(records(frame.iloc[20_000:20_500]))
    proba = pipeline.estimator.predict_proba(x)[:, 1]  # type: ignore[union-attr]
    singles = np.array([pipeline.scores(x[i : i + 1])[0] for i in range(len(x))])
    assert np.array_equal(singles, proba)  # bit for bit: same comparisons, same summation order
    assert np.array_equal(pipeline.scores(x[:10]), proba[:10])
    x[0, 3] = np.nan  # NaN takes the estimator's own missing-value path
    assert pipeline.scores(x[:1])[0] == pipeline.estimator.predict_proba(x[:1])[0, 1]  # type: ignore[union-attr]


def test_river_model_learns_online_and_its_fast_path_equals_river(small_frame: pd.DataFrame) -> None:
    x = small_frame[["user_activity:ctr_7d", "item_activity:ctr_24h", "position"]].fillna(0).to_numpy(float)
    y = small_frame["clicked"].to_numpy()
    river = RiverLogisticRegression(epochs=2, seed=3).fit(x, y)
    again = RiverLogisticRegression(epochs=2, seed=3).fit(x, y)
    assert np.array_equal(river.predict_proba(x), again.predict_proba(x))  # seeded
    before = river.weights()[0].copy()
    river.partial_fit(x[:500], y[:500])
    assert not np.array_equal(before, river.weights()[0])  # keeps learning
    pipeline = make_estimator("river_logistic_regression", "classification", {"epochs": 1}, seed=1).fit(x, y)
    from models.fastpath import compile_scorer

    fast = compile_scorer(pipeline, "classification")
    np.testing.assert_allclose(fast(x), pipeline.predict_proba(x)[:, 1], rtol=1e-12)


def test_estimator_errors_name_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: logistic_regression"):
        make_estimator("svm", "classification")
    with pytest.raises(ConfigError, match="bad params"):
        make_estimator("logistic_regression", "classification", {"not_a_param": 1})


def test_metrics_know_their_direction() -> None:
    assert METRICS["roc_auc"].higher_is_better and not METRICS["log_loss"].higher_is_better
    assert math.isnan(METRICS["roc_auc"](np.array([0, 0]), np.array([0.1, 0.2])))  # one class: undefined
    assert is_better("roc_auc", 0.61, 0.60, 0.005) and not is_better("roc_auc", 0.603, 0.60, 0.005)
    assert is_better("rmse", 1.0, 1.1, 0.05) and not is_better("rmse", 1.1, 1.0)
