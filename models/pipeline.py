"""The Model Pipeline: pre (assemble the feature vector), the estimator, post (score, class, ranking).

The same object runs in training (``fit``/``evaluate`` on a training frame) and in serving
(``assemble`` + ``scores`` + ``post`` on rows built from the online store and the request),
so a feature is computed by one code path in both places:

* **pre** -- :meth:`ModelPipeline.assemble`. A row carries stored features under their refs
  (``"user_activity:clicks_1h"``) and request fields under their names (``"position"``).
  On-demand transforms of the spec's features run through
  :func:`features.on_demand.apply_on_demand` (bound from the repository, never serialised).
  A missing input of a transform is passed as ``None``: the transform's own rule applies
  (``item_ctr`` counts it as 0). A missing (None/NaN) column of the feature vector falls back
  to ``spec.defaults[column]``, else to **0.0** -- the value of a windowed count, sum or ratio
  over no events, which is what "no stored value" means for this platform's aggregates
  (declare a default for anything where 0 is a real, different value). Each row reports the
  names that fell back: vector columns that were defaulted and transform inputs that were
  missing. Scaling lives inside the estimator (``StandardScaler`` in the sklearn pipeline of
  the models that need it), so it is fitted with the model and serialised with it.
* **estimator** -- :meth:`ModelPipeline.scores`: P(class 1) for binary classification, the
  value for regression, the cluster for clustering, through :mod:`models.fastpath`.
* **post** -- :meth:`ModelPipeline.post`: per row a :class:`Prediction`; for ``rank`` the
  item ids (``post.rank_key``) of the row's group (``spec.group_key``) ordered by score.

The per-request path uses no pandas: a dict per row, one numpy array per batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from features.on_demand import OnDemandTransform, apply_on_demand
from features.repository import FeatureRepository
from headwater.errors import HeadwaterError
from models.estimators import make_estimator
from models.fastpath import Scorer, compile_scorer
from models.metrics import METRICS, TASK_METRICS
from models.spec import ModelSpec, stored_reads

__all__ = ["ModelPipeline", "Prediction", "rank_items", "records"]


class Prediction(NamedTuple):
    score: float | None
    label: str | None
    ranked_items: list[str]


class NotFittedError(HeadwaterError):
    """The pipeline has no fitted estimator yet."""


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A frame's rows as dicts with missing values (NaN, NA, NaT) as None, as serving rows carry them."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")  # type: ignore[return-value]


def _floats(values: np.ndarray, what: str) -> np.ndarray:
    """Object cells (numbers, None, NaN, pd.NA) as float64 with NaN for missing; strings refused."""
    try:
        return pd.to_numeric(pd.Series(values, dtype=object), errors="raise").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
    except (TypeError, ValueError) as exc:
        raise HeadwaterError(f"{what}: features must be numbers ({exc})") from exc


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def rank_items(
    rows: Sequence[Mapping[str, Any]], scores: np.ndarray, *, group_key: str | None, rank_key: str, top_k: int
) -> dict[str, list[str]]:
    """Per group (``""`` when there is no group key), the ``rank_key`` values by score, best first.

    Ties break on the item id, so a ranking is reproducible.
    """
    groups: dict[str, list[tuple[float, str]]] = {}
    for row, score in zip(rows, scores.tolist(), strict=True):
        group = "" if group_key is None else str(row.get(group_key, ""))
        groups.setdefault(group, []).append((-score, str(row[rank_key])))
    return {g: [item for _, item in sorted(items)[:top_k]] for g, items in groups.items()}


def rank_frame(groups: np.ndarray, items: np.ndarray, scores: np.ndarray, *, top_k: int) -> pd.DataFrame:
    """:func:`rank_items` for millions of rows (batch inference), vectorised: one row per group
    (sorted) with its ``ranked_items`` (best first, ties on the item id) and its best ``score``."""
    table = pd.DataFrame({"group": groups.astype(str), "neg": -scores, "item": items.astype(str)})
    table = table.sort_values(["group", "neg", "item"], kind="stable")
    by_group = table.groupby("group", sort=True)
    return pd.DataFrame(
        {
            "ranked_items": table[by_group.cumcount() < top_k].groupby("group", sort=True)["item"].agg(list),
            "score": -by_group["neg"].min(),
        }
    ).reset_index()


class ModelPipeline:
    """Pre, estimator and post of one model spec; on-demand transforms bound from ``repository``."""

    def __init__(
        self,
        spec: ModelSpec,
        repository: FeatureRepository,
        estimator: BaseEstimator | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        spec.validate_against(repository)
        self.spec = spec
        self.columns: list[str] = [*spec.features, *spec.request_features]
        self.reads: dict[str, list[str]] = stored_reads(spec, repository)
        self.params: dict[str, Any] = dict(spec.params if params is None else params)
        self._defaults = [float(spec.defaults.get(c) or 0.0) for c in self.columns]
        # Each transform once, with the (output name, ref) pairs the vector uses.
        transforms: dict[str, tuple[OnDemandTransform, list[tuple[str, str]]]] = {}
        for ref in repository.resolve_many(spec.features):
            if ref.transform is not None:
                transforms.setdefault(ref.owner, (ref.transform, []))[1].append((ref.name, ref.ref))
        self._transforms = list(transforms.values())
        self.estimator: BaseEstimator | None = None
        self._scorer: Scorer | None = None
        self._classes: list[str] = ["0", "1"]  # str() of the estimator's classes, once (post is per row)
        if estimator is not None:
            self._bind(estimator)

    def _bind(self, estimator: BaseEstimator) -> None:
        self.estimator = estimator
        self._scorer = compile_scorer(estimator, self.spec.task)
        self._classes = [str(c) for c in getattr(estimator, "classes_", [0, 1])]

    @property
    def defaults(self) -> list[float]:
        """Per column of the vector, the value a missing one takes (the spec's default, else 0)."""
        return self._defaults

    @property
    def has_transforms(self) -> bool:
        """Whether pre runs on-demand transforms (per row) before the vector is read."""
        return bool(self._transforms)

    # ---- pre --------------------------------------------------------------------------------
    def _prepare(self, row: Mapping[str, Any], missing: list[str]) -> Mapping[str, Any]:
        work = dict(row)
        for transform, outputs in self._transforms:
            for key, param in zip(transform.inputs, transform.params, strict=True):
                value = work.get(key, work.get(param))
                if _is_missing(value):
                    # None, never NaN: a NaN would reach the function as a truthy float.
                    work[key] = None
                    if key not in missing:
                        missing.append(key)
            produced = apply_on_demand(transform, [work])[0]
            for name, ref in outputs:
                work[ref] = produced[name]
        return work

    def assemble(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, list[list[str]]]:
        """The feature matrix (columns in :attr:`columns` order) and, per row, the names that fell back."""
        x = np.empty((len(rows), len(self.columns)), dtype=np.float64)
        defaulted: list[list[str]] = []
        columns, defaults = self.columns, self._defaults
        for i, row in enumerate(rows):
            missing: list[str] = []
            work = self._prepare(row, missing) if self._transforms else row
            out = x[i]
            for j, column in enumerate(columns):
                value = work.get(column)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    value = defaults[j]
                    missing.append(column)
                try:
                    out[j] = value
                except (TypeError, ValueError) as exc:
                    raise HeadwaterError(
                        f"model {self.spec.name!r}: {column} is {value!r}; features must be numbers"
                    ) from exc
            defaulted.append(missing)
        return x, defaulted

    def assemble_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`assemble` of a whole frame, column-wise: the same matrix, and a missing mask.

        Training sets have millions of rows; stored and request columns are converted with
        numpy instead of row by row. On-demand transforms are Python functions and still run
        per row, through the same :meth:`_prepare` as serving, on their inputs only. The mask
        is True where a column fell back to its default. ``tests/models`` checks the result
        equals :meth:`assemble` of the frame's records.
        """
        n = len(frame)
        produced: dict[str, np.ndarray] = {}
        if self._transforms:
            inputs = {k for t, _ in self._transforms for k in (*t.inputs, *t.params)}
            rows = records(frame[[c for c in frame.columns if c in inputs]])
            outputs = [ref for _, outs in self._transforms for _, ref in outs]
            cells = [[work.get(ref) for ref in outputs] for work in (self._prepare(r, []) for r in rows)]
            table = np.array(cells, dtype=object).reshape(n, len(outputs))
            for k, ref in enumerate(outputs):
                produced[ref] = _floats(table[:, k], f"model {self.spec.name!r}: {ref}")
        x = np.empty((n, len(self.columns)), dtype=np.float64)
        missing = np.zeros((n, len(self.columns)), dtype=bool)
        for j, column in enumerate(self.columns):
            if column in produced:
                values = produced[column]
            elif column in frame.columns:
                values = _floats(frame[column].to_numpy(dtype=object), f"model {self.spec.name!r}: {column}")
            else:
                values = np.full(n, np.nan)
            missing[:, j] = np.isnan(values)
            x[:, j] = np.where(missing[:, j], self._defaults[j], values)
        return x, missing

    # ---- estimator --------------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None) -> ModelPipeline:
        """Fit the estimator on a training frame (labels, stored refs, request fields, the label)."""
        if params is not None:
            self.params = dict(params)
        x, _ = self.assemble_frame(frame)
        estimator = make_estimator(self.spec.estimator, self.spec.task, self.params, self.spec.seed)
        if self.spec.task == "clustering":
            estimator.fit(x)
        else:
            estimator.fit(x, self.target(frame))
        self._bind(estimator)
        return self

    def target(self, frame: pd.DataFrame) -> np.ndarray:
        """The label column as the estimator learns it (integers for classification)."""
        if self.spec.label not in frame.columns:
            raise HeadwaterError(
                f"model {self.spec.name!r}: the frame has no label column {self.spec.label!r}"
            )
        y = frame[self.spec.label].to_numpy()
        return y.astype(np.int64) if self.spec.task == "classification" else y.astype(np.float64)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """The estimator alone: P(class 1) | regression value | cluster, one float per row."""
        if self._scorer is None:
            raise NotFittedError(f"model {self.spec.name!r} is not fitted: call fit() or load_pipeline()")
        return self._scorer(x)

    # ---- post -------------------------------------------------------------------------------
    def label(self, score: float) -> str | None:
        """The class a score stands for (classification, clustering), else None: the post stage's rule."""
        if self.spec.task == "clustering":
            return str(int(score))
        if self.spec.task != "classification":
            return None
        classes = self._classes
        if len(classes) != 2:
            return None
        return classes[1] if score >= self.spec.post.threshold else classes[0]

    def post(self, rows: Sequence[Mapping[str, Any]], scores: np.ndarray) -> list[Prediction]:
        """Per row: the score, the class (classification, clustering) and, for ``rank``, its group's items."""
        return [
            Prediction(score, label, items or [])  # a list of its own per row
            for score, label, items in zip(*self.post_columns(rows, scores), strict=True)
        ]

    def post_columns(
        self, rows: Sequence[Mapping[str, Any]], scores: np.ndarray
    ) -> tuple[list[float | None], list[str | None], list[list[str]]]:
        """:meth:`post` column-wise: scores, classes and ranked items, one each per row (a
        server answering column-wise builds no object per row). ``rows`` are read only for
        ``rank``."""
        n = len(scores)
        values = scores.tolist()
        if self.spec.task == "classification" and len(self._classes) == 2:  # label(), for a whole batch
            classes = self._classes
            labels: list[str | None] = [classes[k] for k in (scores >= self.spec.post.threshold).tolist()]
        else:
            labels = [self.label(score) for score in values]
        if self.spec.task == "clustering":
            values = [None] * n
        if self.spec.post.kind != "rank":
            return values, labels, [[]] * n  # one shared empty list: read, never appended to
        group_key = self.spec.group_key
        ranked = rank_items(
            rows, scores, group_key=group_key, rank_key=self.spec.post.rank_key, top_k=self.spec.post.top_k
        )
        items = [ranked.get("" if group_key is None else str(row.get(group_key, "")), []) for row in rows]
        return values, labels, items

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[Prediction]:
        """pre -> estimator -> post."""
        x, _ = self.assemble(rows)
        return self.post(rows, self.scores(x))

    def rank(
        self, rows: Sequence[Mapping[str, Any]], *, group_key: str | None = None, top_k: int | None = None
    ) -> dict[str, list[str]]:
        """Per group (default ``spec.group_key``), the ``post.rank_key`` values ordered by score."""
        x, _ = self.assemble(rows)
        return rank_items(
            rows,
            self.scores(x),
            group_key=group_key or self.spec.group_key,
            rank_key=self.spec.post.rank_key,
            top_k=top_k or self.spec.post.top_k,
        )

    def evaluate(self, frame: pd.DataFrame) -> dict[str, float]:
        """Every metric of the task on a labelled frame (NaN where undefined, e.g. one class only)."""
        x, _ = self.assemble_frame(frame)
        s = self.scores(x)
        result: dict[str, float] = {}
        for name in TASK_METRICS[self.spec.task]:
            metric = METRICS[name]
            if metric.needs == "clusters":
                result[name] = metric(x, s.astype(np.int64))
            elif metric.needs == "label":
                result[name] = metric(self.target(frame), (s >= self.spec.post.threshold).astype(np.int64))
            else:
                result[name] = metric(self.target(frame), s)
        return result
