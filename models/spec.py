"""Model specs: what a model reads, predicts, how it is trained, tuned, post-processed and promoted.

A spec is declared in Python (see :mod:`models.examples.clickstream`) and validated twice:
its own fields when it is built (unknown estimator or metric -> :class:`ConfigError` naming
the known ones), and its feature refs against the feature repository when it is loaded
(:func:`load_specs`, or :meth:`ModelSpec.validate_against`): an unknown ref raises
:class:`NotFoundError` listing the known refs.

Feature values must be numeric (long, double, boolean): a string feature such as
``user_activity:last_clicked_item_7d`` is refused at validation. Encoding categorical
strings is a modelling decision that belongs in an on-demand transform returning a number,
where training and serving share it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from features.repository import FeatureRepository
from headwater.errors import ConfigError, HeadwaterError
from headwater.settings import Settings
from models.estimators import ESTIMATORS
from models.metrics import TASK_METRICS, get_metric

__all__ = [
    "NUMERIC_DTYPES",
    "ModelSpec",
    "PostSpec",
    "PromotionPolicy",
    "SearchSpec",
    "load_specs",
    "stored_reads",
]

Value = str | int | float | bool | None
NUMERIC_DTYPES = frozenset({"long", "int", "double", "float", "boolean"})
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class SearchSpec(BaseModel):
    """Hyperparameter search over the training part, scored by time-ordered cross-validation.

    ``method="grid"``: ``space`` maps each param to a list of values (every combination is tried).
    ``method="optuna"``: each param maps to a list (categorical) or to
    ``{"low": .., "high": .., "log": bool, "type": "int" | "float"}``; ``n_trials`` TPE trials
    seeded with the spec's seed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["grid", "optuna"] = "grid"
    space: Mapping[str, Any]
    n_trials: int = Field(20, ge=1)
    cv_folds: int = Field(3, ge=2)

    @model_validator(mode="after")
    def _check_space(self) -> SearchSpec:
        if not self.space:
            raise ConfigError("search space is empty: map at least one param to its candidate values")
        for name, dim in self.space.items():
            if isinstance(dim, list | tuple) and dim:
                continue
            if self.method == "optuna" and isinstance(dim, Mapping) and {"low", "high"} <= set(dim):
                continue
            raise ConfigError(
                f"search space {name!r}: {dim!r}; give a non-empty list of values"
                + (
                    " or {'low': .., 'high': .., 'log': bool, 'type': 'int'|'float'}"
                    if self.method == "optuna"
                    else ""
                )
            )
        return self


class PostSpec(BaseModel):
    """After the estimator: a score, a class (score >= threshold), or a ranking of items per group.

    ``rank``: the rows of one group (``group_key``, by default the first entity key that is not
    ``rank_key``) are ordered by score, best first, and the top ``top_k`` ``rank_key`` values kept.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["score", "class", "rank"] = "score"
    rank_key: str = "item_id"
    group_key: str | None = None
    top_k: int = Field(10, ge=1)
    threshold: float = 0.5


class PromotionPolicy(BaseModel):
    """The gate for moving the ``production`` alias: beat the incumbent on its holdout by a margin."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str | None = None  # None: the spec's metric
    min_improvement: float = Field(0.0, ge=0.0)
    cooldown_s: int = Field(0, ge=0)


class ModelSpec(BaseModel):
    """One model: its inputs, label, estimator, search space, post-processing and promotion policy."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str
    entity_keys: tuple[str, ...]
    features: tuple[str, ...]
    request_features: tuple[str, ...] = ()
    label: str
    task: Literal["classification", "regression", "clustering"]
    estimator: str
    params: Mapping[str, Any] = Field(default_factory=dict)
    search: SearchSpec | None = None
    metric: str = "roc_auc"
    defaults: Mapping[str, Value] = Field(default_factory=dict)
    post: PostSpec = PostSpec()
    serve_precomputed: bool = False
    promotion: PromotionPolicy = PromotionPolicy()
    owner: str
    contact: str = ""
    description: str = ""
    consumers: tuple[str, ...] = ()
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        where = f"model spec {self.name!r}"
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"{where}: use lower case letters, digits and _ in its name")
        if not self.entity_keys:
            raise ConfigError(f"{where}: name at least one entity key (e.g. user_id)")
        if not self.features and not self.request_features:
            raise ConfigError(f"{where}: list at least one feature ref or request feature")
        columns = [*self.features, *self.request_features]
        if len(set(columns)) != len(columns):
            raise ConfigError(f"{where}: a feature is listed twice in {columns}")
        if self.label in columns:
            raise ConfigError(f"{where}: the label {self.label!r} is also a feature")
        kind = ESTIMATORS.get(self.estimator)
        if kind is None:
            raise ConfigError(
                f"{where}: unknown estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}"
            )
        if self.task not in kind.tasks:
            fitting = [n for n, k in ESTIMATORS.items() if self.task in k.tasks]
            raise ConfigError(
                f"{where}: estimator {self.estimator!r} does not do {self.task}; use {', '.join(fitting)}"
            )
        for metric in (self.metric, self.promotion.metric or self.metric):
            try:
                get_metric(metric, self.task)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc} (known for {self.task}: "
                                  f"{', '.join(TASK_METRICS[self.task])})") from None  # fmt: skip
        unknown_defaults = set(self.defaults) - set(columns)
        if unknown_defaults:
            raise ConfigError(f"{where}: defaults for {sorted(unknown_defaults)}, which are not features")
        if self.post.kind == "rank" and self.post.rank_key not in self.entity_keys:
            raise ConfigError(f"{where}: post rank_key {self.post.rank_key!r} is not an entity key")
        if self.post.kind == "rank" and self.task not in {"classification", "regression"}:
            raise ConfigError(f"{where}: ranking needs scores; {self.task} has none")
        return self

    @property
    def group_key(self) -> str | None:
        """The rows' field ranked items are grouped by (``post.group_key`` or the other entity key)."""
        if self.post.group_key is not None:
            return self.post.group_key
        return next((k for k in self.entity_keys if k != self.post.rank_key), None)

    @property
    def promotion_metric(self) -> str:
        return self.promotion.metric or self.metric

    def validate_against(self, repository: FeatureRepository) -> None:
        """Refs exist (else NotFoundError listing the known ones), are numeric and keyed by our entities."""
        where = f"model spec {self.name!r}"
        try:
            resolved = repository.resolve_many(self.features)
        except HeadwaterError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        strings = [r.ref for r in resolved if r.dtype not in NUMERIC_DTYPES]
        if strings:
            raise ConfigError(
                f"{where}: features {strings} are not numeric; encode them in an on-demand transform "
                "returning a number (numeric features only)"
            )
        for fs_name in stored_reads(self, repository):
            entity = repository.feature_set(fs_name).entity
            if entity not in self.entity_keys:
                raise ConfigError(
                    f"{where}: feature set {fs_name!r} is keyed by {entity!r}, not among entity_keys "
                    f"{list(self.entity_keys)}"
                )


def stored_reads(spec: ModelSpec, repository: FeatureRepository) -> dict[str, list[str]]:
    """Stored features to read per feature set, on-demand transforms' inputs included (in ref order)."""
    reads: dict[str, list[str]] = {}
    for ref in repository.resolve_many(spec.features):
        needed = [ref] if ref.transform is None else repository.resolve_many(ref.transform.feature_inputs)
        for r in needed:
            names = reads.setdefault(r.owner, [])
            if r.name not in names:
                names.append(r.name)
    return reads


def load_specs(settings: Settings, repository: FeatureRepository | None = None) -> list[ModelSpec]:
    """The specs named by ``settings.batch.model_specs`` (module:attr, a list or a factory), validated."""
    from processors.worker import load_repository  # the processors package is heavy; import on use

    target = settings.batch.model_specs
    module_name, _, attr = target.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr or "specs")
        specs = found() if callable(found) else found
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"batch.model_specs {target!r} cannot be loaded: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"batch.model_specs {target!r}: invalid model spec: {exc}") from exc
    specs = list(specs)
    bad = [s for s in specs if not isinstance(s, ModelSpec)]
    if bad:
        raise ConfigError(f"batch.model_specs {target!r} returned {bad[0]!r}, not a ModelSpec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"batch.model_specs {target!r}: model names repeat: {names}")
    repository = repository or load_repository(settings)
    for spec in specs:
        spec.validate_against(repository)
    return specs
