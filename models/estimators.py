"""The estimators a model spec can name, built with fixed seeds.

``make_estimator(name, task, params, seed)`` returns an unfitted scikit-learn estimator.
Models that need standardised inputs (linear models, k-means, river's SGD learners) come
as ``Pipeline([("scale", StandardScaler()), ("model", ...)])``; ``params`` always address
the model itself (``{"C": 0.1}``), never the pipeline step, so search spaces read the same
for every estimator.

river's online learners are wrapped so they look like scikit-learn estimators on numpy
arrays (``fit``/``partial_fit``/``predict_proba``/``predict``), learning through river's
own mini-batch API (``learn_many`` / ``predict_proba_many`` on pandas frames). ``fit`` makes
``epochs`` seeded passes over shuffled mini-batches; ``partial_fit`` is one more pass over
new data, which is how an online model keeps learning after deployment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from river import linear_model as river_linear
from river import optim as river_optim
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.cluster import KMeans
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from headwater.errors import ConfigError

__all__ = [
    "ESTIMATORS",
    "EstimatorKind",
    "RiverLinearRegression",
    "RiverLogisticRegression",
    "make_estimator",
]


class _RiverModel(BaseEstimator):  # type: ignore[misc]
    """A river linear learner behind the scikit-learn interface; features are named x0, x1, ..."""

    def __init__(
        self,
        learning_rate: float = 0.05,
        l2: float = 0.0,
        epochs: int = 3,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        self.learning_rate = learning_rate
        self.l2 = l2
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed

    def _new_model(self) -> Any:
        raise NotImplementedError

    def _frame(self, x: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(np.asarray(x, dtype=np.float64), columns=[f"x{i}" for i in range(x.shape[1])])

    def _learn(self, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
        frame, target = self._frame(x), pd.Series(self._target(y))
        rng = np.random.default_rng(self.seed)
        for _ in range(epochs):
            order = rng.permutation(len(frame))
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                self.model_.learn_many(frame.iloc[idx], target.iloc[idx])

    def _target(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, dtype=np.float64)

    def fit(self, x: np.ndarray, y: np.ndarray) -> _RiverModel:
        self.model_ = self._new_model()
        self.n_features_in_ = x.shape[1]
        self._learn(x, y, self.epochs)
        return self

    def partial_fit(self, x: np.ndarray, y: np.ndarray) -> _RiverModel:
        if not hasattr(self, "model_"):
            self.model_ = self._new_model()
            self.n_features_in_ = x.shape[1]
        self._learn(x, y, 1)
        return self

    def weights(self) -> tuple[np.ndarray, float]:
        """The learned coefficients in column order, and the intercept (for the serving fast path)."""
        w = self.model_.weights
        return np.array([w.get(f"x{i}", 0.0) for i in range(self.n_features_in_)]), float(
            self.model_.intercept
        )


class RiverLogisticRegression(ClassifierMixin, _RiverModel):  # type: ignore[misc]
    """river ``linear_model.LogisticRegression`` trained by seeded mini-batch SGD."""

    def _new_model(self) -> Any:
        return river_linear.LogisticRegression(optimizer=river_optim.SGD(self.learning_rate), l2=self.l2)

    def _target(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y).astype(bool)

    def fit(self, x: np.ndarray, y: np.ndarray) -> RiverLogisticRegression:
        self.classes_ = np.array([0, 1])
        super().fit(x, y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        proba = self.model_.predict_proba_many(self._frame(x))
        positive = proba[True].to_numpy(dtype=np.float64) if True in proba.columns else np.zeros(len(x))
        return np.column_stack([1.0 - positive, positive])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.predict_proba(x)[:, 1] >= 0.5).astype(np.int64)


class RiverLinearRegression(RegressorMixin, _RiverModel):  # type: ignore[misc]
    """river ``linear_model.LinearRegression`` trained by seeded mini-batch SGD."""

    def _new_model(self) -> Any:
        return river_linear.LinearRegression(optimizer=river_optim.SGD(self.learning_rate), l2=self.l2)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.predict_many(self._frame(x)), dtype=np.float64)


def _scaled(model: BaseEstimator) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("model", model)])


@dataclass(frozen=True)
class EstimatorKind:
    """A buildable estimator: the tasks it serves and its seeded constructor."""

    name: str
    tasks: frozenset[str]
    build: Callable[[str, dict[str, Any], int], BaseEstimator]
    description: str = ""


def _by_task(
    task: str, classifier: Callable[..., BaseEstimator], regressor: Callable[..., BaseEstimator]
) -> Any:
    return classifier if task == "classification" else regressor


_CR = frozenset({"classification", "regression"})
ESTIMATORS: dict[str, EstimatorKind] = {
    k.name: k
    for k in [
        EstimatorKind(
            "logistic_regression",
            frozenset({"classification"}),
            lambda task, p, seed: _scaled(
                LogisticRegression(**{"max_iter": 1000, "random_state": seed, **p})
            ),
            "standardised inputs, sklearn LogisticRegression (lbfgs)",
        ),
        EstimatorKind(
            "linear_regression",
            frozenset({"regression"}),
            lambda task, p, seed: _scaled(LinearRegression(**p)),
            "standardised inputs, ordinary least squares",
        ),
        EstimatorKind(
            "hist_gradient_boosting",
            _CR,
            # No early stopping by default: its validation split would take rows away from a
            # rare positive class, and a fixed iteration count is what tuning searches over.
            lambda task, p, seed: _by_task(
                task, HistGradientBoostingClassifier, HistGradientBoostingRegressor
            )(**{"early_stopping": False, "random_state": seed, **p}),
            "gradient-boosted trees on binned features (missing values native)",
        ),
        EstimatorKind(
            "random_forest",
            _CR,
            # One job: the forest is identical either way, and serving processes stay single-threaded.
            lambda task, p, seed: _by_task(task, RandomForestClassifier, RandomForestRegressor)(
                **{"n_estimators": 100, "n_jobs": 1, "random_state": seed, **p}
            ),
            "random forest",
        ),
        EstimatorKind(
            "kmeans",
            frozenset({"clustering"}),
            lambda task, p, seed: _scaled(
                KMeans(**{"n_clusters": 8, "n_init": 10, "random_state": seed, **p})
            ),
            "standardised inputs, k-means clustering",
        ),
        EstimatorKind(
            "river_logistic_regression",
            frozenset({"classification"}),
            lambda task, p, seed: _scaled(RiverLogisticRegression(**{"seed": seed, **p})),
            "standardised inputs, river online logistic regression (SGD)",
        ),
        EstimatorKind(
            "river_linear_regression",
            frozenset({"regression"}),
            lambda task, p, seed: _scaled(RiverLinearRegression(**{"seed": seed, **p})),
            "standardised inputs, river online linear regression (SGD)",
        ),
    ]
}


def make_estimator(
    name: str, task: str, params: Mapping[str, Any] | None = None, seed: int = 0
) -> BaseEstimator:
    """An unfitted estimator; ConfigError naming the known estimators, or the ones for the task."""
    kind = ESTIMATORS.get(name)
    if kind is None:
        raise ConfigError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    if task not in kind.tasks:
        fitting = [n for n, k in ESTIMATORS.items() if task in k.tasks]
        raise ConfigError(f"estimator {name!r} does not do {task}; for {task} use {', '.join(fitting)}")
    try:
        return kind.build(task, dict(params or {}), seed)
    except TypeError as exc:
        raise ConfigError(f"estimator {name!r}: bad params {dict(params or {})!r}: {exc}") from exc
