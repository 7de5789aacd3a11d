"""Fast scoring: the fitted estimator's arithmetic without scikit-learn's per-call checks.

One module for every place that scores: :meth:`models.pipeline.ModelPipeline.scores` (training,
evaluation, batch inference) and the prediction service (:mod:`serving.scoring`, which also
scores single rows through :meth:`Scorer.one`).

scikit-learn validates its input on every ``predict_proba`` call (dtype, finiteness, feature
names, thread pool set-up): measured here (2 shared cores), ``HistGradientBoostingClassifier``
takes ~0.5 ms on one row and ``LogisticRegression`` ~150 us, against a budget of well under
100 us per prediction for a service answering >= 3,000 predictions/s.

:func:`compile_scorer` reads the fitted parameters once and returns a :class:`Scorer` computing
the same floating-point operations in the same order, so its results equal the estimator's
bit for bit (tests/models/test_fastpath.py asserts it):

* standardised linear models: ``((x - mean) / scale) @ coef + intercept``, then the logistic;
* gradient-boosted trees (binary or regression, numeric splits), chosen per batch size:

  - few rows: the trees compiled to Python source, nested ``if``/``else`` over the row's
    values bound to locals (~4 us a row for 100 trees; any numpy-based walk pays ~1 us per
    numpy call and level, ~70 us a row);
  - more rows: scikit-learn's own Cython tree walk (``_predict_from_raw_data``, what
    ``predict_proba`` runs), called per tree without the input validation around it
    (~3 us per tree per call, then ~1.5 us a row).

  Both follow scikit-learn's rules: ``x <= threshold`` goes left, NaN follows the node's
  ``missing_go_to_left``, and leaf values are added one tree at a time to the baseline in
  iteration order, in float64, as ``_raw_predict`` does; then ``expit`` for classification.

Anything else falls back to the estimator's own ``predict_proba`` / ``predict``.
"""

from __future__ import annotations

import math
import threading
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

__all__ = ["RowScorer", "Scorer", "compile_scorer", "reference_scores"]

BatchFn = Callable[[np.ndarray], np.ndarray]
RowScorer = Callable[[list[float]], float]

#: Rows per tree call at which scikit-learn's Cython walk overtakes the compiled source: a call
#: costs ~3 us per tree, a row ~6 us in compiled Python against ~1.5 us in Cython (measured on
#: 100 trees of 31 leaves: crossover near 50 rows, i.e. half the tree count).
ROWS_PER_TREE_CROSSOVER = 0.5
#: Python's tokenizer allows 100 levels of indentation; deeper trees are not compiled.
_MAX_COMPILED_DEPTH = 90
#: Beyond this many nodes the generated source (and its compile time) grows too large.
_MAX_COMPILED_NODES = 200_000


def reference_scores(estimator: BaseEstimator, task: str, x: np.ndarray) -> np.ndarray:
    """Scores through the estimator's public API: P(class 1) | the regression value | the cluster."""
    if task == "classification":
        proba = estimator.predict_proba(x)
        classes = list(estimator.classes_)
        if len(classes) == 2:
            return np.asarray(proba[:, 1], dtype=np.float64)
        return np.asarray(proba.max(axis=1), dtype=np.float64)
    return np.asarray(estimator.predict(x), dtype=np.float64)


class Scorer:
    """``scorer(x)``: one float64 score per row of ``x`` (rows x columns, float64);
    ``scorer.one(row)``: the score of one row given as a list of floats."""

    def __init__(self, batch: BatchFn) -> None:
        self._batch = batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._batch(x)

    def one(self, row: list[float]) -> float:
        return float(self._batch(np.array([row], dtype=np.float64))[0])


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

    return Scorer(score)


# -- gradient-boosted trees ---------------------------------------------------------------------
def _tree_source(nodes: np.ndarray, lines: list[str], node: int, indent: int) -> None:
    pad = "    " * indent
    row = nodes[node]
    if row["is_leaf"]:
        lines.append(f"{pad}r += {float(row['value'])!r}")
        return
    feature, threshold = int(row["feature_idx"]), float(row["num_threshold"])
    limit = repr(threshold) if math.isfinite(threshold) else ("INF" if threshold > 0 else "-INF")
    left, right = int(row["left"]), int(row["right"])
    # NaN compares False both ways: "x > t" sends it to the else branch, "x <= t" too, so the
    # test is written so that its else branch is the node's missing-value direction.
    if row["missing_go_to_left"]:
        test, first, second = f"x{feature} > {limit}", right, left
    else:
        test, first, second = f"x{feature} <= {limit}", left, right
    lines.append(f"{pad}if {test}:")
    _tree_source(nodes, lines, first, indent + 1)
    lines.append(f"{pad}else:")
    _tree_source(nodes, lines, second, indent + 1)


def _compile_rows(node_arrays: list[np.ndarray], baseline: float, n_features: int) -> RowScorer:
    """``row -> raw score``: every tree as nested ``if``/``else`` over locals ``x0, x1, ...``."""
    lines = ["def raw(x):"]
    if n_features:
        # One UNPACK_SEQUENCE binds every feature to a local: cheaper than x[j] at each node.
        lines.append("    " + ", ".join(f"x{j}" for j in range(n_features)) + ", = x")
    lines.append(f"    r = {baseline!r}")
    for nodes in node_arrays:
        _tree_source(nodes, lines, 0, 1)
    lines.append("    return r")
    namespace: dict[str, Any] = {"INF": math.inf}
    exec(compile("\n".join(lines), "<compiled trees>", "exec"), namespace)
    raw: RowScorer = namespace["raw"]
    return raw


class _Trees(Scorer):
    """A binary classifier's or regressor's trees, without categorical splits."""

    def __init__(
        self,
        model: HistGradientBoostingClassifier | HistGradientBoostingRegressor,
        logistic: bool,
        fallback: Scorer,
    ) -> None:
        from sklearn.ensemble._hist_gradient_boosting._predictor import _predict_from_raw_data
        from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

        super().__init__(self._score)
        self._walk = _predict_from_raw_data
        self._n_threads = _openmp_effective_n_threads
        predictors = [iteration[0] for iteration in model._predictors]
        self._trees = [(p.nodes, p.raw_left_cat_bitsets) for p in predictors]
        self._known_cats, self._f_idx_map = model._bin_mapper.make_known_categories_bitsets()
        self._baseline = float(np.asarray(model._baseline_prediction, dtype=np.float64).ravel()[0])
        self._n_features = int(model.n_features_in_)
        self._logistic = logistic
        self._fallback = fallback
        depth = max((int(p.get_max_depth()) for p in predictors), default=0)
        size = sum(len(p.nodes) for p in predictors)
        self._compilable = depth <= _MAX_COMPILED_DEPTH and size <= _MAX_COMPILED_NODES
        self._row_limit = max(1, int(len(predictors) * ROWS_PER_TREE_CROSSOVER))
        self._raw_row: RowScorer | None = None  # compiled on first use: training never needs it
        self._lock = threading.Lock()

    def _rows(self) -> RowScorer | None:
        if self._raw_row is None and self._compilable:
            with self._lock:
                if self._raw_row is None:
                    self._raw_row = _compile_rows(
                        [n for n, _ in self._trees], self._baseline, self._n_features
                    )
        return self._raw_row

    def one(self, row: list[float]) -> float:
        raw_row = self._rows()
        if raw_row is None or len(row) != self._n_features:
            return self._fallback.one(row)
        raw = raw_row(row)
        return float(expit(raw)) if self._logistic else raw

    def _score(self, x: np.ndarray) -> np.ndarray:
        if (
            not isinstance(x, np.ndarray)
            or x.ndim != 2
            or x.shape[1] != self._n_features
            or x.dtype != np.float64
        ):
            return self._fallback(x)  # the estimator converts the input, or says why it cannot
        n = len(x)
        raw_row = self._rows() if 0 < n < self._row_limit else None
        if raw_row is not None:
            raw = np.fromiter((raw_row(r) for r in x.tolist()), np.float64, n)
        else:
            raw = self._raw_walk(x)
        return np.asarray(expit(raw) if self._logistic else raw, dtype=np.float64)

    def _raw_walk(self, x: np.ndarray) -> np.ndarray:
        """``_raw_predict`` minus its checks: the baseline, then each tree's leaf values added."""
        n = len(x)
        raw = np.full(n, self._baseline)
        out = np.empty(n)
        walk, known, f_idx_map, threads = self._walk, self._known_cats, self._f_idx_map, self._n_threads()
        for nodes, cat_bitsets in self._trees:
            walk(nodes, x, cat_bitsets, known, f_idx_map, threads, out)
            raw += out
        return raw


def _trees(model: Any, task: str, fallback: Scorer) -> Scorer | None:
    if len(model._predictors) == 0 or len(model._predictors[0]) != 1:
        return None  # multiclass: one tree per class per iteration
    if getattr(model, "_preprocessor", None) is not None:
        return None  # categorical columns encoded by the estimator before its trees
    if any(iteration[0].nodes["is_categorical"].any() for iteration in model._predictors):
        return None
    return _Trees(model, task == "classification", fallback)


def compile_scorer(estimator: BaseEstimator, task: str) -> Scorer:
    """A :class:`Scorer` computing :func:`reference_scores` of the fitted estimator, fast."""

    def reference(x: np.ndarray) -> np.ndarray:
        return reference_scores(estimator, task, x)

    fallback = Scorer(reference)
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
