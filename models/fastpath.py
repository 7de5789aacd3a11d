"""Fast scoring for serving: the fitted estimator's arithmetic without scikit-learn's per-call checks.

scikit-learn validates its input on every ``predict_proba`` call (dtype, finiteness, feature
names, thread pool set-up). On one row that costs far more than the model: measured here
(2 shared cores) ``HistGradientBoostingClassifier.predict_proba`` on one row takes ~9 ms
(OpenMP start-up on every call) and ``LogisticRegression`` ~150 us, against a budget of well
under 100 us per prediction for a service that answers >= 3,000 predictions/s.

:func:`compile_scorer` reads the fitted parameters once and returns a function ``x -> scores``
computing the same floating-point operations in the same order, so its results equal
the estimator's (the tests assert it on real data):

* standardised linear models: ``((x - mean) / scale) @ coef + intercept``, then the logistic;
* gradient-boosted trees: every tree's nodes flattened into one array, all trees walked at
  once with vectorised numpy (one step per tree level), leaf values summed in iteration order
  from the baseline exactly as ``_raw_predict`` adds them. Used for small batches only:
  from ``_TREE_BATCH`` rows on, the compiled predictors win and the estimator is called.

Anything else falls back to the estimator's own ``predict_proba`` / ``predict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from models.estimators import RiverLogisticRegression

__all__ = ["Scorer", "compile_scorer", "reference_scores"]

Scorer = Callable[[np.ndarray], np.ndarray]
_TREE_BATCH = 64


def reference_scores(estimator: BaseEstimator, task: str, x: np.ndarray) -> np.ndarray:
    """Scores through the estimator's public API: P(class 1) | the regression value | the cluster."""
    if task == "classification":
        proba = estimator.predict_proba(x)
        classes = list(estimator.classes_)
        if len(classes) == 2:
            return np.asarray(proba[:, 1], dtype=np.float64)
        return np.asarray(proba.max(axis=1), dtype=np.float64)
    return np.asarray(estimator.predict(x), dtype=np.float64)


def _split(estimator: BaseEstimator) -> tuple[StandardScaler | None, Any]:
    if isinstance(estimator, Pipeline) and len(estimator.steps) == 2:
        scaler, model = estimator.steps[0][1], estimator.steps[1][1]
        if isinstance(scaler, StandardScaler):
            return scaler, model
    if isinstance(estimator, Pipeline):
        return None, None
    return None, estimator


def _linear(scaler: StandardScaler | None, coef: np.ndarray, intercept: float, logistic: bool) -> Scorer:
    mean = None if scaler is None or scaler.mean_ is None else np.asarray(scaler.mean_, dtype=np.float64)
    scale = None if scaler is None or scaler.scale_ is None else np.asarray(scaler.scale_, dtype=np.float64)
    coef = np.ascontiguousarray(coef, dtype=np.float64)

    def score(x: np.ndarray) -> np.ndarray:
        z = x
        if mean is not None:
            z = z - mean
        if scale is not None:
            z = z / scale
        raw = z @ coef + intercept
        return np.asarray(expit(raw) if logistic else raw, dtype=np.float64)

    return score


class _Trees:
    """All trees of a fitted HistGradientBoosting model as flat arrays, walked level by level."""

    def __init__(self, model: HistGradientBoostingClassifier | HistGradientBoostingRegressor) -> None:
        predictors = [iteration[0] for iteration in model._predictors]
        nodes = [p.nodes for p in predictors]
        sizes = np.array([len(n) for n in nodes])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        flat = np.concatenate(nodes)
        self.supported = not flat["is_categorical"].any()
        leaf = flat["is_leaf"].astype(bool)
        here = np.arange(len(flat), dtype=np.intp)
        shift = np.repeat(offsets, sizes)
        # Leaves point to themselves, so walking max-depth steps leaves every tree on its leaf.
        left = np.where(leaf, here, flat["left"].astype(np.intp) + shift)
        right = np.where(leaf, here, flat["right"].astype(np.intp) + shift)
        self.children = np.stack([left, right], axis=1).ravel()  # 2*node + (go right)
        self.feature = np.where(leaf, 0, flat["feature_idx"]).astype(np.intp)
        self.threshold = np.where(leaf, np.inf, flat["num_threshold"]).astype(np.float64)
        self.value = flat["value"].astype(np.float64)
        self.roots = offsets
        self.depth = max((int(p.get_max_depth()) for p in predictors), default=0)
        self.baseline = float(np.asarray(model._baseline_prediction).ravel()[0])

    def raw(self, x: np.ndarray) -> np.ndarray:
        n, width = x.shape
        flat_x = np.ascontiguousarray(x, dtype=np.float64).ravel()
        row_start = (np.arange(n, dtype=np.intp) * width)[:, None]
        node = np.broadcast_to(self.roots, (n, len(self.roots)))
        for _ in range(self.depth):
            go_right = flat_x.take(row_start + self.feature.take(node)) > self.threshold.take(node)
            node = self.children.take(2 * node + go_right)
        # Sequential sum from the baseline, the order in which _raw_predict accumulates.
        leaves = np.concatenate([np.full((n, 1), self.baseline), self.value.take(node)], axis=1)
        return np.asarray(np.cumsum(leaves, axis=1)[:, -1], dtype=np.float64)


def _trees(model: Any, task: str, fallback: Scorer) -> Scorer | None:
    if len(model._predictors) == 0 or len(model._predictors[0]) != 1:
        return None  # multiclass: one tree per class per iteration
    trees = _Trees(model)
    if not trees.supported:
        return None
    logistic = task == "classification"

    def score(x: np.ndarray) -> np.ndarray:
        # NaN needs the per-node missing-value direction: leave it to the estimator (assemble
        # fills every missing value, so serving never gets here with one).
        if len(x) >= _TREE_BATCH or np.isnan(x).any():
            return fallback(x)
        raw = trees.raw(x)
        return np.asarray(expit(raw) if logistic else raw, dtype=np.float64)

    return score


def compile_scorer(estimator: BaseEstimator, task: str) -> Scorer:
    """A function computing :func:`reference_scores` of the fitted estimator, fast on small batches."""

    def fallback(x: np.ndarray) -> np.ndarray:
        return reference_scores(estimator, task, x)

    scaler, model = _split(estimator)
    if isinstance(model, LogisticRegression) and model.coef_.shape[0] == 1:
        return _linear(scaler, model.coef_[0], float(model.intercept_[0]), logistic=True)
    if isinstance(model, LinearRegression) and np.ndim(model.coef_) == 1:
        return _linear(scaler, model.coef_, float(model.intercept_), logistic=False)
    if isinstance(model, HistGradientBoostingClassifier | HistGradientBoostingRegressor) and scaler is None:
        fast = _trees(model, task, fallback)
        if fast is not None:
            return fast
    if isinstance(model, RiverLogisticRegression):
        # river's predict_proba_many goes through pandas (~ms per call); its model is linear.
        coef, intercept = model.weights()
        return _linear(scaler, coef, intercept, logistic=True)
    return fallback
