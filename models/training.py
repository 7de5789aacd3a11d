"""Training: labels from the offline store, point-in-time training frames, reproducible fits.

``train`` is deterministic: rows are put in a canonical order (label time, then entity
keys), split by time (the latest ``holdout_share`` of rows is the holdout), tuned and fitted
with the spec's seed, and saved as deterministic bytes -- the same frame gives the same
model sha256. What might differ between two runs of the same data (the code version,
package versions, wall times) is metadata beside the artifact, never in it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batch.offline_store.base import OfflineStore
from features.repository import FeatureRepository
from headwater.errors import HeadwaterError
from headwater.sdk import FeatureStore
from headwater.settings import Settings
from models.artifact import dump_pipeline
from models.pipeline import ModelPipeline
from models.spec import ModelSpec, stored_reads
from models.tuning import search

__all__ = [
    "LABELS_SQL",
    "TrainedModel",
    "build_labels",
    "code_version",
    "data_hash",
    "feature_stats",
    "package_versions",
    "train",
    "training_frame",
]

log = logging.getLogger(__name__)

# One row per impression; clicked when a CLICK of the same user, item and slot has the same
# time (how the clickstream logs a click). label_time is 1 ms before the impression, so the
# features of a row never include the impression itself or its click.
LABELS_SQL = """
SELECT i.event_id AS event_id, i.user_id AS user_id, i.item_id AS item_id, i.position AS position,
       i.campaign AS campaign, i.event_time AS event_time, i.event_time - 1 AS label_time,
       toUInt8(c.user_id != '') AS clicked
FROM (
    SELECT event_id, user_id, item_id, position, campaign, toInt64(event_time) AS event_time
    FROM clicks
    WHERE action = 'IMPRESSION' AND toInt64(event_time) >= {start:Int64} AND toInt64(event_time) < {end:Int64}
    LIMIT 1 BY event_id  -- a redelivered event is one impression
) AS i
LEFT JOIN (
    SELECT DISTINCT user_id, item_id, position, toInt64(event_time) AS event_time
    FROM clicks
    WHERE action = 'CLICK' AND toInt64(event_time) >= {start:Int64} AND toInt64(event_time) < {end:Int64}
) AS c
ON i.user_id = c.user_id AND i.item_id = c.item_id AND i.position = c.position AND i.event_time = c.event_time
ORDER BY event_time, user_id, item_id, position, event_id
SETTINGS join_use_nulls = 0
"""

_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


@dataclass
class TrainedModel:
    """A fitted pipeline, its artifact bytes and everything the registry records about it."""

    pipeline: ModelPipeline
    artifact: bytes
    sha256: str
    params: dict[str, Any]
    metrics: dict[str, float]
    data_hash: str
    rows: int
    holdout: pd.DataFrame
    feature_stats: dict[str, dict[str, float]]
    package_versions: dict[str, str]
    code_version: str
    train_rows: int = 0
    search_trials: list[tuple[dict[str, Any], float]] = field(default_factory=list)


def build_labels(store: OfflineStore, start_ms: int, end_ms: int) -> pd.DataFrame:
    """Impressions in ``[start_ms, end_ms)`` with ``clicked`` 0/1 and ``label_time = event_time - 1``."""
    frame = store.query_df(LABELS_SQL, {"start": int(start_ms), "end": int(end_ms)})
    for column in ("event_time", "label_time", "position"):
        frame[column] = frame[column].astype("int64")
    frame["clicked"] = frame["clicked"].astype("int64")
    return frame


def training_frame(
    source: Settings | FeatureStore,
    spec: ModelSpec,
    labels: pd.DataFrame,
    *,
    bitemporal: bool = True,
    time_column: str = "label_time",
) -> pd.DataFrame:
    """The labels with the spec's *stored* features (on-demand inputs included), point-in-time.

    On-demand features are not fetched: the pipeline computes them from these columns, the
    code path serving uses. ``bitemporal=False`` is needed for history that was backfilled
    (its write time is the backfill's, after every label).
    """
    store = source if isinstance(source, FeatureStore) else FeatureStore(source)
    refs = [f"{fs}:{name}" for fs, names in stored_reads(spec, store.repository).items() for name in names]
    missing = [c for c in spec.request_features if c not in labels.columns]
    if missing:
        raise HeadwaterError(f"model {spec.name!r}: labels lack request features {missing}")
    return store.get_historical_features(labels, refs, bitemporal=bitemporal, time_column=time_column)


def _sort_columns(spec: ModelSpec, frame: pd.DataFrame) -> list[str]:
    keys = ["label_time", *spec.entity_keys, "event_time", "event_id", *spec.request_features]
    return [c for c in dict.fromkeys(keys) if c in frame.columns]


def data_hash(frame: pd.DataFrame) -> str:
    """sha256 of a canonical serialisation: columns by name, rows in the given order, NaN as null."""
    h = hashlib.sha256()
    for column in sorted(frame.columns, key=str):
        values = frame[column]
        h.update(f"{column}\x1f".encode())
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            array = values.to_numpy(dtype=np.float64, na_value=np.nan)
            array = np.where(np.isnan(array), np.nan, array)  # one NaN bit pattern
            h.update(array.tobytes())
        else:
            h.update(json.dumps([None if pd.isna(v) else str(v) for v in values]).encode())
    return h.hexdigest()


def feature_stats(pipeline: ModelPipeline, frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per vector column: count, missing share, mean, std, min, max, quantiles (the drift reference)."""
    x, mask = pipeline.assemble_frame(frame)
    stats: dict[str, dict[str, float]] = {}
    for j, column in enumerate(pipeline.columns):
        missing = int(mask[:, j].sum())
        values = x[:, j]
        entry = {
            "count": float(len(values)),
            "missing_share": missing / len(values) if len(values) else math.nan,
        }
        if len(values):
            entry.update(mean=float(values.mean()), std=float(values.std()), min=float(values.min()),
                         max=float(values.max()))  # fmt: skip
            for q, v in zip(_QUANTILES, np.quantile(values, _QUANTILES), strict=True):
                entry[f"p{round(q * 100):02d}"] = float(v)
        stats[column] = entry
    return stats


def package_versions() -> dict[str, str]:
    out = {}
    for dist in ("scikit-learn", "numpy", "scipy", "pandas", "river", "skops", "optuna", "headwater"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def code_version() -> str:
    """The git commit of the checkout (``+dirty`` with local changes), else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        return f"git:{commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"headwater=={package_versions()['headwater']}"


def train(
    spec: ModelSpec, repository: FeatureRepository, frame: pd.DataFrame, *, holdout_share: float = 0.2
) -> TrainedModel:
    """Split by time, tune (if ``spec.search``), fit on the past, evaluate on the holdout, save."""
    if not 0.0 < holdout_share < 1.0:
        raise HeadwaterError(f"holdout_share must be between 0 and 1, not {holdout_share}")
    if frame.empty:
        raise HeadwaterError(f"model {spec.name!r}: the training frame is empty")
    ordered = frame.sort_values(_sort_columns(spec, frame), kind="mergesort").reset_index(drop=True)
    cut = len(ordered) - max(1, round(len(ordered) * holdout_share))
    if cut < 1:
        raise HeadwaterError(f"model {spec.name!r}: {len(ordered)} rows are too few to hold some out")
    past, holdout = ordered.iloc[:cut].reset_index(drop=True), ordered.iloc[cut:].reset_index(drop=True)
    pipeline = ModelPipeline(spec, repository)
    if spec.task == "classification" and pipeline.target(past).min() == pipeline.target(past).max():
        raise HeadwaterError(
            f"model {spec.name!r}: every training label {spec.label!r} is {pipeline.target(past)[0]}; "
            "widen the date range so both classes occur"
        )
    x, _ = pipeline.assemble_frame(past)
    result = search(spec, x, pipeline.target(past) if spec.task != "clustering" else np.zeros(len(x)))
    pipeline.fit(past, params=result.params)
    metrics = pipeline.evaluate(holdout)
    artifact = dump_pipeline(pipeline)
    trained = TrainedModel(
        pipeline=pipeline,
        artifact=artifact,
        sha256=hashlib.sha256(artifact).hexdigest(),
        params=result.params,
        metrics=metrics,
        data_hash=data_hash(ordered),
        rows=len(ordered),
        holdout=holdout,
        feature_stats=feature_stats(pipeline, past),
        package_versions=package_versions(),
        code_version=code_version(),
        train_rows=len(past),
        search_trials=result.trials,
    )
    log.info("model %s: trained on %d rows (holdout %d), %s, sha256 %s", spec.name, len(past),
             len(holdout), metrics, trained.sha256[:12])  # fmt: skip
    return trained
