"""Real fitted models for the registry tests.

``models/`` (the Model Pipeline) is built concurrently by another engineer, so the gate tests
score real scikit-learn models, saved with skops, on a real holdout (the Wisconsin breast
cancer data bundled with scikit-learn) stored as a Parquet artifact, with the same
(candidate, incumbent) -> scores contract as :func:`registry.holdout_evaluator`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import pytest
import skops.io as sio
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from headwater.settings import Settings
from registry import ModelVersion, Registry, load_holdout
from streams.serde import Serde
from tests.registry.real_models import trained  # noqa: F401 - a fixture shared by the tests

SPEC = {"name": "cancer", "metric": "roc_auc", "promotion": {"min_improvement": 0.01, "cooldown_s": 0}}


@dataclass(frozen=True)
class Fitted:
    """Two real models of different quality and the holdout they are compared on."""

    weak: bytes  # one feature
    strong: bytes  # ten features
    weak_auc: float
    strong_auc: float
    holdout: bytes  # Parquet


@pytest.fixture(scope="session")
def fitted() -> Fitted:
    data, y = load_breast_cancer(return_X_y=True, as_frame=True)
    x = data.iloc[:, :10]
    x.columns = [c.replace(" ", "_") for c in x.columns]
    train, hold = slice(0, 400), slice(400, None)
    weak = LogisticRegression(max_iter=500).fit(x.iloc[train, [9]], y.iloc[train])
    strong = LogisticRegression(max_iter=2000).fit(x.iloc[train], y.iloc[train])
    holdout = x.iloc[hold].assign(label=y.iloc[hold])
    buf = io.BytesIO()
    holdout.to_parquet(buf)
    return Fitted(
        weak=sio.dumps(weak),
        strong=sio.dumps(strong),
        weak_auc=float(roc_auc_score(holdout["label"], weak.predict_proba(holdout.iloc[:, [9]])[:, 1])),
        strong_auc=float(roc_auc_score(holdout["label"], strong.predict_proba(holdout.iloc[:, :10])[:, 1])),
        holdout=buf.getvalue(),
    )


def score(registry: Registry, mv: ModelVersion, holdout: pd.DataFrame) -> float:
    model = sio.loads(registry.load_artifact(mv))  # skops' default trusted types: sklearn estimators
    columns = list(model.feature_names_in_)
    return float(roc_auc_score(holdout["label"], model.predict_proba(holdout[columns])[:, 1]))


def evaluator(registry: Registry):  # type: ignore[no-untyped-def]
    """(candidate, incumbent, metric) -> roc_auc of each on the candidate's holdout, as
    holdout_evaluator does (the models here report roc_auc only)."""

    def evaluate(candidate: ModelVersion, incumbent: ModelVersion, metric: str) -> tuple[float, float]:
        assert metric == "roc_auc", f"the gate asked for {metric}; these models report roc_auc only"
        holdout = load_holdout(registry, candidate)
        return score(registry, candidate, holdout), score(registry, incumbent, holdout)

    return evaluate


def register(registry: Registry, artifact: bytes, fitted: Fitted, **extra: object) -> ModelVersion:
    uri, sha = registry.artifacts.put(fitted.holdout, suffix=".parquet")
    metadata = {"spec": SPEC, "holdout_uri": uri, "holdout_sha256": sha, **extra}
    return registry.register("cancer", artifact, feature_refs=["cells:radius"], metrics={}, metadata=metadata)


@pytest.fixture()
def registry(settings: Settings, serde: Serde) -> Iterator[Registry]:
    with Registry(settings, serde, actor="test") as reg:
        yield reg
