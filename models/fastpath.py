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
    (~3 us per tree per call, then ~1.5 us a row);
  - more rows, where the caller asked for machine code (the prediction service does, at model
    load: :func:`compile_scorer`'s ``native_dir``): the trees compiled to C by tl2cgen and gcc
    (~60 us for 100 rows of 46 trees against ~370 us for the Cython walk). The baseline is
    the first tree, a single leaf, so the sum runs in scikit-learn's order and the result is
    the same bits; then ``expit`` here. The library is cached by the trees' content, so a
    restart or a second server process loads it instead of compiling; without gcc or with
    any failure the Cython walk serves (logged once).

  Both follow scikit-learn's rules: ``x <= threshold`` goes left, NaN follows the node's
  ``missing_go_to_left``, and leaf values are added one tree at a time to the baseline in
  iteration order, in float64, as ``_raw_predict`` does; then ``expit`` for classification.

Anything else falls back to the estimator's own ``predict_proba`` / ``predict``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from models.estimators import RiverLogisticRegression

__all__ = ["RowScorer", "Scorer", "compile_scorer", "reference_scores"]

log = logging.getLogger(__name__)

BatchFn = Callable[[np.ndarray], np.ndarray]
RowScorer = Callable[[list[float]], float]

#: Rows per tree call at which scikit-learn's Cython walk overtakes the compiled source: a call
#: costs ~3 us per tree, a row ~6 us in compiled Python against ~1.5 us in Cython (measured on
#: 100 trees of 31 leaves: crossover near 50 rows, i.e. half the tree count).
ROWS_PER_TREE_CROSSOVER = 0.5
#: Rows from which the compiled library beats the compiled Python source (a call costs ~15 us,
#: a row ~0.5 us; the source ~4 us a row): measured on 46 trees of 31 leaves.
NATIVE_MIN_ROWS = 4
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
        self._native: _NativeTrees | None = None

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
        native = self._native
        limit = self._row_limit if native is None else NATIVE_MIN_ROWS
        raw_row = self._rows() if 0 < n < limit else None
        if raw_row is not None:
            raw = np.fromiter((raw_row(r) for r in x.tolist()), np.float64, n)
        elif native is not None and n:
            raw = native(x)
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

    def compile_native(self, native_dir: Path) -> None:
        """Serve batches from the trees compiled to a shared library (cached in ``native_dir``)."""
        try:
            native = _NativeTrees.load(self._trees, self._baseline, self._n_features, native_dir)
            probe = self._probe()
            if native(probe).tolist() != self._raw_walk(probe).tolist():
                raise ValueError(f"{native.libpath.name} scores differently from scikit-learn's walk")
            self._native = native
        except Exception as exc:  # no gcc, a read-only directory...: the Cython walk still serves
            log.warning("trees_not_compiled reason=%s: batches use scikit-learn's tree walk", exc)

    def _probe(self) -> np.ndarray:
        """Rows on both sides of every threshold, and missing values: a check that a cached
        library (by its name, the trees' digest) holds these trees, run at every load."""
        rng = np.random.default_rng(0)
        thresholds = np.concatenate([n["num_threshold"][~n["is_leaf"].astype(bool)] for n, _ in self._trees])
        if not thresholds.size:
            thresholds = np.zeros(1)
        x: np.ndarray = rng.choice(thresholds, size=(256, self._n_features)) + rng.choice(
            [-1e-9, 0.0, 1e-9], (256, 1)
        )
        x[rng.random(x.shape) < 0.1] = np.nan
        return x


class _NativeTrees:
    """The trees as a tl2cgen shared library: ``raw(x)`` equals :meth:`_Trees._raw_walk`, bit for bit.

    tl2cgen's predictor may be called by one thread at a time, hence one per thread (the
    library itself is loaded once by the dynamic loader).
    """

    _log: ClassVar[Any] = None  # tl2cgen's log callback once re-routed (:meth:`_quiet`)

    def __init__(self, libpath: Path) -> None:
        import tl2cgen

        self._tl2cgen = tl2cgen
        self.libpath = libpath
        self._local = threading.local()
        self._predictor()  # loads now: a broken library fails at load, not at the first request

    def _predictor(self) -> Any:
        predictor = getattr(self._local, "predictor", None)
        if predictor is None:
            predictor = self._local.predictor = self._tl2cgen.Predictor(self.libpath, nthread=1)
        return predictor

    def __call__(self, x: np.ndarray) -> np.ndarray:
        matrix = self._tl2cgen.DMatrix(x, dtype="float64")  # NaN: missing, as scikit-learn's
        margin = self._predictor().predict(matrix, pred_margin=True)
        return np.asarray(margin, dtype=np.float64).reshape(len(x))

    @staticmethod
    def _quiet() -> None:
        """tl2cgen prints its compiler's progress to stdout (a server's output, a CLI's table);
        its log goes to this module's debug log instead. No public setting exists: this
        re-registers the callback tl2cgen registers at import, and a failure changes nothing."""
        if _NativeTrees._log is None:
            try:
                from tl2cgen.libloader import _LIB

                def debug(message: bytes) -> None:
                    log.debug("tl2cgen: %s", message.decode(errors="replace"))

                _NativeTrees._log = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(debug)  # kept alive: C holds it
                _LIB.TL2cgenRegisterLogCallback(_NativeTrees._log)
            except Exception:  # pragma: no cover - only the log's destination is at stake
                _NativeTrees._log = False

    @classmethod
    def load(
        cls, trees: list[tuple[np.ndarray, Any]], baseline: float, n_features: int, native_dir: Path
    ) -> _NativeTrees:
        """The library of these trees from ``native_dir``, compiled there first if absent."""
        import tl2cgen

        cls._quiet()
        digest = hashlib.sha256(f"{tl2cgen.__version__} {baseline!r} {n_features}".encode())
        for nodes, _ in trees:
            digest.update(np.ascontiguousarray(nodes).tobytes())
        libpath = native_dir / f"trees-{digest.hexdigest()[:32]}.so"
        if not libpath.exists():
            native_dir.mkdir(parents=True, exist_ok=True)
            building = libpath.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.so")
            try:
                tl2cgen.export_lib(
                    _treelite_model(trees, baseline, n_features),
                    toolchain="gcc",
                    libpath=building,
                    params={"parallel_comp": max(1, min(8, len(trees) // 16))},
                )
                os.replace(building, libpath)  # atomic: another process may be compiling the same
            finally:
                building.unlink(missing_ok=True)
        return cls(libpath)


def _treelite_model(trees: list[tuple[np.ndarray, Any]], baseline: float, n_features: int) -> Any:
    """A treelite model of scikit-learn's trees, the baseline as a first one-leaf tree.

    Not ``treelite.sklearn.import_model``: it adds the baseline after the trees' sum, which
    rounds differently from scikit-learn's ``baseline + tree_1 + tree_2 ...``.
    """
    from treelite.model_builder import Metadata, ModelBuilder, PostProcessorFunc, TreeAnnotation

    count = len(trees) + 1
    builder: Any = ModelBuilder(  # treelite leaves start/end methods unannotated
        threshold_type="float64",
        leaf_output_type="float64",
        metadata=Metadata(
            num_feature=n_features,
            task_type="kRegressor",  # the raw sum: expit is applied here, as for the other paths
            average_tree_output=False,
            num_target=1,
            num_class=[1],
            leaf_vector_shape=(1, 1),
        ),
        tree_annotation=TreeAnnotation(num_tree=count, target_id=[0] * count, class_id=[0] * count),
        postprocessor=PostProcessorFunc(name="identity"),
        base_scores=[0.0],
    )
    builder.start_tree()
    builder.start_node(0)
    builder.leaf(baseline)
    builder.end_node()
    builder.end_tree()
    for nodes, _ in trees:
        builder.start_tree()
        for i, row in enumerate(nodes.tolist()):
            builder.start_node(i)
            if row[_IS_LEAF]:
                builder.leaf(float(row[_VALUE]))
            else:  # scikit-learn: NaN goes the node's missing direction, else x <= threshold goes left
                builder.numerical_test(
                    int(row[_FEATURE]),
                    float(row[_THRESHOLD]),
                    default_left=bool(row[_MISSING_LEFT]),
                    opname="<=",
                    left_child_key=int(row[_LEFT]),
                    right_child_key=int(row[_RIGHT]),
                )
            builder.end_node()
        builder.end_tree()
    return builder.commit()


def _node_fields() -> tuple[int, ...]:
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    names = PREDICTOR_RECORD_DTYPE.names or ()
    fields = ("is_leaf", "value", "feature_idx", "num_threshold", "missing_go_to_left", "left", "right")
    return tuple(names.index(f) for f in fields)


_IS_LEAF, _VALUE, _FEATURE, _THRESHOLD, _MISSING_LEFT, _LEFT, _RIGHT = _node_fields()


def _trees(model: Any, task: str, fallback: Scorer) -> _Trees | None:
    if len(model._predictors) == 0 or len(model._predictors[0]) != 1:
        return None  # multiclass: one tree per class per iteration
    if getattr(model, "_preprocessor", None) is not None:
        return None  # categorical columns encoded by the estimator before its trees
    if any(iteration[0].nodes["is_categorical"].any() for iteration in model._predictors):
        return None
    return _Trees(model, task == "classification", fallback)


def compile_scorer(estimator: BaseEstimator, task: str, *, native_dir: Path | None = None) -> Scorer:
    """A :class:`Scorer` computing :func:`reference_scores` of the fitted estimator, fast.

    ``native_dir``: compile gradient-boosted trees to machine code, cached in that directory
    (a second or so of gcc once per model; worth it for a service, not for one training run).
    """

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
            if native_dir is not None:
                fast.compile_native(native_dir)
            return fast
    if isinstance(model, RiverLogisticRegression):
        # river's predict_proba_many goes through pandas (~ms per call); its model is linear.
        coef, intercept = model.weights()
        return _linear(scaler, coef, intercept, logistic=True)
    return fallback
