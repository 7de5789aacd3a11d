"""Model metrics by name, each knowing whether higher is better (sklearn.metrics underneath).

A metric reads one of three inputs, named by :attr:`Metric.needs`:

* ``"score"``: the pipeline's score (probability of the positive class, or the regression value);
* ``"label"``: the predicted class (score >= the post threshold for binary classification);
* ``"clusters"``: the feature matrix and the assigned clusters (silhouette, for k-means).

A metric that is undefined on the data (ROC AUC of a holdout with one class only) is NaN,
never an exception: a daily partition of a rare event can hold no positive at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn import metrics as skm

from headwater.errors import ConfigError

__all__ = ["METRICS", "TASK_METRICS", "Metric", "get_metric", "is_better"]

Task = Literal["classification", "regression", "clustering"]


@dataclass(frozen=True)
class Metric:
    name: str
    func: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool
    needs: Literal["score", "label", "clusters"]
    tasks: frozenset[str]

    def __call__(self, y_true: np.ndarray, y_pred: np.ndarray) -> float:
        """The metric, or NaN when it is undefined on these values (one class only, too few rows)."""
        if len(y_true) == 0:
            return math.nan
        if self.needs == "score" and "classification" in self.tasks and len(np.unique(y_true)) < 2:
            return math.nan
        if self.needs == "clusters" and not 2 <= len(np.unique(y_pred)) < len(y_pred):
            return math.nan
        return float(self.func(y_true, y_pred))


def _rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.sqrt(skm.mean_squared_error(y, p)))


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(skm.log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]))


def _silhouette(x: np.ndarray, clusters: np.ndarray) -> float:
    # Bounded sample: silhouette is O(n^2); a fixed seed keeps the value reproducible.
    return float(skm.silhouette_score(x, clusters, sample_size=min(len(x), 5_000), random_state=0))


_C = frozenset({"classification"})
_R = frozenset({"regression"})
METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("roc_auc", skm.roc_auc_score, True, "score", _C),
        Metric("average_precision", skm.average_precision_score, True, "score", _C),
        Metric("log_loss", _log_loss, False, "score", _C),
        Metric("accuracy", skm.accuracy_score, True, "label", _C),
        Metric("rmse", _rmse, False, "score", _R),
        Metric("mae", skm.mean_absolute_error, False, "score", _R),
        Metric("r2", skm.r2_score, True, "score", _R),
        Metric("silhouette", _silhouette, True, "clusters", frozenset({"clustering"})),
    ]
}

TASK_METRICS: dict[str, list[str]] = {
    task: [name for name, m in METRICS.items() if task in m.tasks]
    for task in ("classification", "regression", "clustering")
}


def get_metric(name: str, task: str | None = None) -> Metric:
    """The metric called ``name``; ConfigError naming the known ones (for ``task``) otherwise."""
    metric = METRICS.get(name)
    if metric is None:
        raise ConfigError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    if task is not None and task not in metric.tasks:
        raise ConfigError(
            f"metric {name!r} does not apply to {task}; use one of {', '.join(TASK_METRICS.get(task, []))}"
        )
    return metric


def is_better(metric: str, candidate: float, incumbent: float, margin: float = 0.0) -> bool:
    """Whether ``candidate`` beats ``incumbent`` by at least ``margin`` in the metric's direction."""
    m = get_metric(metric)
    if math.isnan(candidate):
        return False
    if math.isnan(incumbent):
        return True
    return candidate - incumbent >= margin if m.higher_is_better else incumbent - candidate >= margin
