"""Grid and optuna searches are deterministic and pick their best candidate."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from features.repository import FeatureRepository
from headwater.errors import ConfigError
from models.pipeline import ModelPipeline, records
from models.spec import ModelSpec, SearchSpec
from models.tuning import cv_score, search


def _data(
    spec: ModelSpec, repository: FeatureRepository, frame: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    pipeline = ModelPipeline(spec, repository)
    return pipeline.assemble(records(frame))[0], pipeline.target(frame)


def test_grid_search_tries_every_combination_and_keeps_the_best(
    example_specs: dict[str, ModelSpec], repository: FeatureRepository, small_frame: pd.DataFrame
) -> None:
    grid = SearchSpec(method="grid", space={"C": [0.001, 0.1, 10.0], "class_weight": [None, "balanced"]})
    spec = example_specs["ctr_linear"].model_copy(update={"search": grid})
    x, y = _data(spec, repository, small_frame)
    result = search(spec, x, y)
    assert len(result.trials) == 6
    assert result.score == max(v for _, v in result.trials if not math.isnan(v))
    best = next(p for p, v in result.trials if v == result.score)
    assert result.params == best and set(result.params) == {"C", "class_weight"}
    assert cv_score(spec, result.params, x, y, grid.cv_folds) == result.score
    assert search(spec, x, y) == result  # deterministic


def test_optuna_search_is_seeded(
    example_specs: dict[str, ModelSpec], repository: FeatureRepository, small_frame: pd.DataFrame
) -> None:
    spec = example_specs["ctr_linear"]
    assert spec.search is not None and spec.search.method == "optuna"
    x, y = _data(spec, repository, small_frame)
    first, second = search(spec, x, y), search(spec, x, y)
    assert first == second and len(first.trials) == spec.search.n_trials
    assert 1e-3 <= first.params["C"] <= 10.0 and first.params["class_weight"] == "balanced"
    other = search(spec.model_copy(update={"seed": spec.seed + 1}), x, y)
    assert [p["C"] for p, _ in other.trials] != [p["C"] for p, _ in first.trials]


def test_an_int_range_and_too_few_rows(
    example_specs: dict[str, ModelSpec], repository: FeatureRepository, small_frame: pd.DataFrame
) -> None:
    space = {"max_depth": {"low": 2, "high": 4}, "learning_rate": [0.05, 0.1]}
    spec = example_specs["ctr_model"].model_copy(
        update={"params": {"max_iter": 10}, "search": SearchSpec(method="optuna", space=space, n_trials=2)}
    )
    x, y = _data(spec, repository, small_frame)
    result = search(spec, x, y)
    assert all(isinstance(p["max_depth"], int) and 2 <= p["max_depth"] <= 4 for p, _ in result.trials)
    with pytest.raises(ConfigError, match="cannot make 3 folds"):
        search(spec, x[:3], y[:3])
