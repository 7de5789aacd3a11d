"""Gradient-boosted trees compiled to Python source, for scoring one row.

A single-entity call is most of the traffic, and for one row every vectorised approach pays
its per-operation overhead: scikit-learn's predictors ~1 ms (100 trees, an OpenMP region
each), :mod:`models.fastpath`'s level-by-level numpy walk ~65 µs (16 levels x a few numpy
calls). Written out as nested ``if``/``else`` over a list of floats, the same trees take one
comparison per level actually visited (~25 µs), like :mod:`streams.fastpath` does for Avro.

The result is bit-identical to ``HistGradientBoosting*._raw_predict``: the same comparisons
(``x <= threshold`` goes left; NaN follows ``missing_go_to_left``), the leaf values added one
tree at a time from the baseline in iteration order, in float64, and the same link as
:func:`models.fastpath.compile_scorer` (``expit`` for classification). Categorical splits and
multi-class models are not compiled (:func:`compile_trees` returns None).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

__all__ = ["RowScorer", "compile_trees"]

RowScorer = Callable[[list[float]], float]


def _tree_source(nodes: np.ndarray, lines: list[str], node: int, indent: int) -> None:
    pad = "    " * indent
    row = nodes[node]
    if row["is_leaf"]:
        lines.append(f"{pad}r += {float(row['value'])!r}")
        return
    feature, threshold = int(row["feature_idx"]), float(row["num_threshold"])
    limit = repr(threshold) if math.isfinite(threshold) else ("INF" if threshold > 0 else "-INF")
    # NaN compares False both ways: "not x > t" sends it left, "x <= t" right, as sklearn does.
    test = f"not x[{feature}] > {limit}" if row["missing_go_to_left"] else f"x[{feature}] <= {limit}"
    lines.append(f"{pad}if {test}:")
    _tree_source(nodes, lines, int(row["left"]), indent + 1)
    lines.append(f"{pad}else:")
    _tree_source(nodes, lines, int(row["right"]), indent + 1)


def compile_trees(estimator: Any, task: str) -> RowScorer | None:
    """A function ``row (list of floats) -> score`` equal to the pipeline's scorer, or None."""
    model = estimator
    if hasattr(model, "steps"):  # a sklearn Pipeline: only a bare model is compiled
        if len(model.steps) != 1:
            return None
        model = model.steps[0][1]
    if not isinstance(model, HistGradientBoostingClassifier | HistGradientBoostingRegressor):
        return None
    predictors = getattr(model, "_predictors", None)
    if not predictors or any(len(iteration) != 1 for iteration in predictors):
        return None  # multi-class: one tree per class per iteration
    baseline = np.asarray(model._baseline_prediction, dtype=np.float64).ravel()
    if baseline.size != 1:
        return None
    lines = ["def raw(x):", f"    r = {float(baseline[0])!r}"]
    for (predictor,) in predictors:
        nodes = predictor.nodes
        if nodes["is_categorical"].any():
            return None
        _tree_source(nodes, lines, 0, 1)
    lines.append("    return r")
    namespace: dict[str, Any] = {"INF": math.inf}
    exec(compile("\n".join(lines), f"<trees {type(model).__name__}>", "exec"), namespace)
    raw: Callable[[list[float]], float] = namespace["raw"]
    if task == "classification":
        return lambda x: float(expit(raw(x)))
    return raw
