"""Hyperparameter search: a grid or optuna's TPE, scored by time-ordered cross-validation.

Both score a candidate the same way: ``TimeSeriesSplit(cv_folds)`` over the training rows
(already in time order), fit on each past, score the next slice with the spec's metric and
average the folds where it is defined (a fold without a positive has no ROC AUC). Everything
is seeded -- the estimator by ``spec.seed``, optuna's ``TPESampler(seed=spec.seed)``, one
trial at a time -- so the same data gives the same best params.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from sklearn.model_selection import ParameterGrid, TimeSeriesSplit

from headwater.errors import ConfigError
from models.estimators import make_estimator
from models.fastpath import reference_scores
from models.metrics import get_metric
from models.spec import ModelSpec, SearchSpec

__all__ = ["SearchResult", "cv_score", "search"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    """The best params (spec.params overlaid with the winning candidate), its CV score, every trial."""

    params: dict[str, Any]
    score: float
    trials: list[tuple[dict[str, Any], float]] = field(default_factory=list)


def cv_score(spec: ModelSpec, params: Mapping[str, Any], x: np.ndarray, y: np.ndarray, folds: int) -> float:
    """Mean of the spec's metric over time-ordered folds, oriented so that higher is better (NaN: none)."""
    metric = get_metric(spec.metric, spec.task)
    values = []
    for train_idx, test_idx in TimeSeriesSplit(n_splits=folds).split(x):
        if spec.task == "classification" and len(np.unique(y[train_idx])) < 2:
            continue  # nothing to learn from in this past
        estimator = make_estimator(spec.estimator, spec.task, params, spec.seed)
        if spec.task == "clustering":
            estimator.fit(x[train_idx])
            value = metric(x[test_idx], estimator.predict(x[test_idx]))
        else:
            estimator.fit(x[train_idx], y[train_idx])
            scores = reference_scores(estimator, spec.task, x[test_idx])
            truth = y[test_idx]
            value = metric(truth, (scores >= 0.5).astype(np.int64) if metric.needs == "label" else scores)
        if not math.isnan(value):
            values.append(value if metric.higher_is_better else -value)
    return float(np.mean(values)) if values else math.nan


def _suggest(trial: optuna.Trial, name: str, dim: Any) -> Any:
    if isinstance(dim, list | tuple):
        return trial.suggest_categorical(name, list(dim))
    low, high, use_log = dim["low"], dim["high"], bool(dim.get("log", False))
    if dim.get("type") == "int" or (isinstance(low, int) and isinstance(high, int) and "type" not in dim):
        return trial.suggest_int(name, int(low), int(high), log=use_log)
    return trial.suggest_float(name, float(low), float(high), log=use_log)


def search(spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> SearchResult:
    """The best params of ``spec.params`` overlaid with ``spec.search.space`` (spec.params if no search)."""
    s: SearchSpec | None = spec.search
    base = dict(spec.params)
    if s is None:
        return SearchResult(base, math.nan, [])
    if len(x) <= s.cv_folds:
        raise ConfigError(f"model {spec.name!r}: {len(x)} training rows cannot make {s.cv_folds} folds")
    trials: list[tuple[dict[str, Any], float]] = []

    def score(candidate: Mapping[str, Any]) -> float:
        params = {**base, **candidate}
        value = cv_score(spec, params, x, y, s.cv_folds)
        trials.append((params, value))
        log.info("model %s: %s -> %s %.5f", spec.name, dict(candidate), spec.metric, value)
        return value

    if s.method == "grid":
        for candidate in ParameterGrid({k: list(v) for k, v in s.space.items()}):
            score(candidate)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=spec.seed))

        def objective(trial: optuna.Trial) -> float:
            value = score({name: _suggest(trial, name, dim) for name, dim in s.space.items()})
            return value if not math.isnan(value) else -1e18  # undefined: worst, but keep searching

        study.optimize(objective, n_trials=s.n_trials, n_jobs=1)
    # Best: highest defined score; ties keep the first tried (the grid's order, optuna's trial order).
    defined = [(p, v) for p, v in trials if not math.isnan(v)]
    if not defined:
        log.warning(
            "model %s: no search candidate had a defined %s; using spec.params", spec.name, spec.metric
        )
        return SearchResult(base, math.nan, trials)
    best_params, best_value = max(defined, key=lambda pv: pv[1])  # max keeps the first of equals
    return SearchResult(best_params, best_value, trials)
