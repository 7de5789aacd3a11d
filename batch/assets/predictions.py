"""``<model>/batch_predictions``: every entity of the day scored by the production version.

The entities of a day are the values of each of the spec's entity keys seen in that day's
raw clicks; a model with several keys scores their cross product (``ctr_model``: every user
seen x every item seen). Features are the stored values as of the day's end (point-in-time,
read once per entity rather than per pair); request fields take the spec's defaults. The
pipeline does the rest as serving would: pre (on-demand transforms, defaults), estimator,
post. A ``rank`` model gives, per value of its first key, the ``top_k`` items by score (the
pipeline's rank post); others give one score per entity row.

Written twice, keyed by the spec's first entity key:

* online store, feature set ``predictions__<model>``: ``{"score", "ranked_items" (JSON list),
  "model_version"}`` at event time = the day's end, newer-wins, so serving can answer
  ``serve_precomputed`` models without running them;
* warehouse, ``batch_predictions/<model>/<day>.parquet``, queryable in ClickHouse with
  ``SELECT * FROM file('<warehouse>/batch_predictions/<model>/*.parquet', Parquet)``.
"""

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DailyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
)

from batch.assets.common import Warehouse, daily_asset, day_bounds, settings_of, window_of
from batch.assets.events import RAW_CLICKS
from features.repository import FeatureRepository
from headwater.errors import HeadwaterError
from headwater.sdk import FeatureStore
from headwater.settings import Settings
from models.artifact import load_pipeline
from models.pipeline import ModelPipeline, rank_frame
from models.spec import ModelSpec
from registry import Registry
from serving.online_store import open_online_store

Value = bool | int | float | str | None

__all__ = [
    "PREDICTIONS",
    "entity_frame",
    "online_key",
    "predictions_feature_set",
    "score_entities",
    "write_predictions_online",
]

log = logging.getLogger(__name__)

PREDICTIONS = "batch_predictions"


def predictions_feature_set(model: str) -> str:
    """The online-store feature set of a model's precomputed predictions."""
    return f"predictions__{model}"


def entity_frame(
    settings: Settings,
    spec: ModelSpec,
    *,
    pipeline: ModelPipeline,
    repository: FeatureRepository,
    entities: Mapping[str, Sequence[str]],
    as_of_ms: int,
) -> pd.DataFrame:
    """Every combination of the entities with the stored features the pipeline reads, as of ``as_of_ms``."""
    by_key: dict[str, list[str]] = {k: [] for k in spec.entity_keys}
    for fs, names in sorted(pipeline.reads.items()):
        entity = repository.feature_set(fs).entity
        if entity not in by_key:
            raise HeadwaterError(
                f"{spec.name} reads feature set {fs} keyed by {entity!r}, which is not one of its "
                f"entity keys {', '.join(spec.entity_keys)}: add it to entity_keys to batch-score it"
            )
        by_key[entity] += [f"{fs}:{n}" for n in names]
    frame: pd.DataFrame | None = None
    with FeatureStore(settings, repository) as store:
        for key in spec.entity_keys:
            part = pd.DataFrame({key: list(entities[key])})
            if by_key[key]:
                labels = part.assign(label_time=as_of_ms)
                part = store.get_historical_features(
                    labels, by_key[key], bitemporal=settings.batch.training_bitemporal
                ).drop(columns="label_time")
            frame = part if frame is None else frame.merge(part, how="cross")
    assert frame is not None  # a spec has at least one entity key
    for field in spec.request_features:
        if field in spec.defaults:
            frame[field] = spec.defaults[field]
    return frame


def score_entities(spec: ModelSpec, pipeline: ModelPipeline, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per entity (``rank``: per group): ``score`` and ``ranked_items`` (empty unless rank).

    A rank model's group score is its best item's; the ranking is the pipeline's rank post.
    """
    key = online_key(spec)
    if frame.empty:
        return pd.DataFrame({key: pd.Series(dtype=str), "score": pd.Series(dtype=float), "ranked_items": []})
    matrix, _ = pipeline.assemble_frame(frame)  # column-wise: the per-row path costs ~12 µs a row
    scores = np.asarray(pipeline.scores(matrix), dtype=np.float64)
    if spec.post.kind == "rank":
        groups, items = frame[key].to_numpy(), frame[spec.post.rank_key].to_numpy()
        ranked = rank_frame(groups, items, scores, top_k=spec.post.top_k)
        return ranked.rename(columns={"group": key})[[key, "score", "ranked_items"]]
    keys = frame[list(spec.entity_keys)].astype(str).agg("|".join, axis=1)
    return pd.DataFrame(
        {key: keys.to_numpy(), "score": scores, "ranked_items": [[] for _ in range(len(frame))]}
    )


def online_key(spec: ModelSpec) -> str:
    """What precomputed predictions are keyed by: a rank model's group key, else the first entity key
    (several keys: their values joined by ``|``)."""
    if spec.post.kind == "rank" and spec.group_key is not None:
        return spec.group_key
    return spec.entity_keys[0]


def build_prediction_asset(
    spec: ModelSpec,
    repository: FeatureRepository,
    partitions: DailyPartitionsDefinition,
    common: dict[str, Any],
) -> AssetsDefinition:
    name = spec.name

    @daily_asset(
        partitions,
        key=[name, "batch_predictions"],
        deps=[AssetKey([name, "registered_model"]), RAW_CLICKS],
        kinds={"lmdb", "parquet"},
        description=f"Every entity of the day scored by {name}@production: precomputed predictions in the "
        f"online store ({predictions_feature_set(name)}) and in the warehouse.",
        **common,
    )
    def batch_predictions(context: AssetExecutionContext) -> MaterializeResult[Any]:
        settings, window = settings_of(context), window_of(context)
        warehouse = Warehouse(settings)
        with Registry(settings, actor="dagster") as registry:
            production = registry.resolve(f"{name}@production")
            pipeline = load_pipeline(registry.load_artifact(production), repository)
        counts: dict[str, int] = {}
        for day in window.days:
            raw = warehouse.read(RAW_CLICKS, day, needed_by=f"{name}/batch_predictions")
            entities = {}
            for k in spec.entity_keys:
                if k not in raw.column_names:
                    raise HeadwaterError(
                        f"raw clicks of {day} have no {k!r} column to take {name}'s entities"
                    )
                entities[k] = sorted(v for v in pc.unique(raw.column(k)).to_pylist() if v is not None)
            end_ms = day_bounds(day)[1]
            frame = entity_frame(
                settings,
                spec,
                pipeline=pipeline,
                repository=repository,
                entities=entities,
                as_of_ms=end_ms - 1,
            )
            scored = score_entities(spec, pipeline, frame)
            write_predictions_online(
                settings, name, scored, key=online_key(spec), event_ms=end_ms, version=production.version
            )
            table = pa.Table.from_pandas(
                scored.assign(model_name=name, model_version=production.version, event_time=end_ms),
                preserve_index=False,
            )
            warehouse.write(PREDICTIONS, day, table, model=name)
            counts[day] = len(scored)
            log.info(
                "%s batch predictions %s: %d entities, version %d", name, day, len(scored), production.version
            )
        return MaterializeResult(
            metadata={
                "entities": sum(counts.values()),
                "entities_per_day": MetadataValue.json(counts),
                "model_version": production.version,
                "online_feature_set": predictions_feature_set(name),
                "sql": MetadataValue.md(
                    f"```sql\nSELECT * FROM {warehouse.relation(PREDICTIONS, model=name)}\n```"
                ),
            }
        )

    return batch_predictions


def write_predictions_online(
    settings: Settings, name: str, scored: pd.DataFrame, *, key: str, event_ms: int, version: int
) -> int:
    """Scored entities into the online store as ``predictions__<model>``, newer-wins at ``event_ms``."""
    rows: list[tuple[str, int, Mapping[str, Value]]] = [
        (str(k), event_ms, {"score": float(s), "ranked_items": json.dumps(items), "model_version": version})
        for k, s, items in zip(scored[key], scored["score"], scored["ranked_items"], strict=True)
    ]
    with open_online_store(settings) as store:
        return store.put_batch(predictions_feature_set(name), rows, ttl_s=settings.batch.predictions_ttl_s)
