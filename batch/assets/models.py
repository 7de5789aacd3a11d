"""Per model spec: ``<model>/training_set`` (+ checks), ``<model>/model``, ``<model>/evaluation``.

* ``training_set``: the labels of the training window (the run's days plus
  ``settings.batch.training_lookback_days`` before them) from :func:`models.training.build_labels`,
  joined point-in-time to the stored features the model reads
  (:meth:`headwater.sdk.FeatureStore.get_historical_features`). On-demand features are not
  materialised: the pipeline computes them from these columns and the request fields, the
  same way serving does.
* ``model``: :func:`models.training.train` on it; the skops artifact and the holdout (Parquet)
  go to the content-addressed artifact store, a summary (hashes, params, metrics, feature
  statistics) to the warehouse.
* ``evaluation``: the candidate and the current production version scored on the
  candidate's holdout, side by side.

The registration and the batch predictions are in :mod:`batch.assets.registration` and
:mod:`batch.assets.predictions`. Every file is named by the run's window key, so re-running
a partition rewrites the same files and, training being deterministic, the same artifact.
"""

import io
import logging
from typing import Any

import pandas as pd
import pyarrow as pa
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DailyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    TimeWindowPartitionMapping,
    asset_check,
)

from batch.assets import quality
from batch.assets.common import (
    RESOURCE_KEY,
    Warehouse,
    check_result,
    daily_asset,
    parquet_bytes,
    settings_of,
    window_of,
)
from batch.assets.events import FEATURE_VALUES, RAW_CLICKS
from batch.offline_store import open_offline_store
from features.repository import FeatureRepository
from headwater.errors import NotFoundError
from headwater.sdk import FeatureStore
from models.artifact import load_pipeline
from models.pipeline import ModelPipeline
from models.spec import ModelSpec
from models.training import build_labels, train, training_frame
from registry import Registry, open_artifact_store

__all__ = ["build_model_assets", "build_model_checks", "stored_refs"]

log = logging.getLogger(__name__)

TRAINING_SETS, MODELS, EVALUATIONS = "training_sets", "models", "evaluations"
LABEL_TIME = "label_time"


def stored_refs(pipeline: ModelPipeline) -> list[str]:
    """The stored feature refs the pipeline reads (on-demand inputs included), in a stable order."""
    return [f"{fs}:{name}" for fs, names in sorted(pipeline.reads.items()) for name in names]


def build_model_assets(
    spec: ModelSpec, repository: FeatureRepository, partitions: DailyPartitionsDefinition, lookback_days: int
) -> list[AssetsDefinition]:
    from batch.assets.predictions import build_prediction_asset
    from batch.assets.registration import build_registration_asset

    name = spec.name
    window_mapping = TimeWindowPartitionMapping(start_offset=-lookback_days)
    common: dict[str, Any] = {
        "group_name": name,
        "owners": [spec.owner] if "@" in spec.owner else [],
    }

    @daily_asset(
        partitions,
        key=[name, "training_set"],
        deps=[
            AssetDep(RAW_CLICKS, partition_mapping=window_mapping),
            AssetDep(FEATURE_VALUES, partition_mapping=window_mapping),
        ],
        kinds={"clickhouse", "parquet"},
        description=f"Labels of {name}'s training window joined point-in-time to the stored features "
        f"it reads. {spec.description}",
        **common,
    )
    def training_set(context: AssetExecutionContext) -> MaterializeResult[Any]:
        settings, window = settings_of(context), window_of(context)
        span = window.with_lookback(settings.batch.training_lookback_days)
        with open_offline_store(settings) as store:
            store.refresh()
            labels = build_labels(store, span.start_ms, span.end_ms)
        refs = stored_refs(ModelPipeline(spec, repository))
        with FeatureStore(settings, repository) as features:
            frame = training_frame(
                features, spec, labels, bitemporal=settings.batch.training_bitemporal, time_column=LABEL_TIME
            )
        frame = frame.sort_values([LABEL_TIME, *spec.entity_keys], kind="stable", ignore_index=True)
        path = Warehouse(settings).write(
            TRAINING_SETS, window.key, pa.Table.from_pandas(frame, preserve_index=False), model=name
        )
        positives = int(pd.to_numeric(frame[spec.label], errors="coerce").fillna(0).gt(0).sum())
        return MaterializeResult(
            metadata={
                "rows": len(frame),
                "positives": positives,
                "window": f"{span.days[0]} .. {span.days[-1]}",
                "features": MetadataValue.json(refs),
                "path": MetadataValue.path(str(path)),
            }
        )

    @daily_asset(
        partitions,
        key=[name, "model"],
        deps=[training_set],
        kinds={"sklearn"},
        description=f"{name} trained on the training set ({spec.estimator}, tuned by "
        f"{spec.search.method if spec.search else 'its fixed params'}): artifact in the artifact store.",
        **common,
    )
    def model(context: AssetExecutionContext) -> MaterializeResult[Any]:
        settings, window = settings_of(context), window_of(context)
        warehouse = Warehouse(settings)
        frame = warehouse.read(TRAINING_SETS, window.key, model=name, needed_by=f"{name}/model").to_pandas()
        trained = train(spec, repository, frame, holdout_share=settings.batch.holdout_share)
        store = open_artifact_store(settings)
        uri, sha256 = store.put(trained.artifact)
        holdout_uri, holdout_sha256 = store.put(
            parquet_bytes(pa.Table.from_pandas(trained.holdout, preserve_index=False)), suffix=".parquet"
        )
        span = window.with_lookback(settings.batch.training_lookback_days)
        summary = {
            "model": name,
            "window": window.key,
            "artifact_uri": uri,
            "artifact_sha256": sha256,
            "holdout_uri": holdout_uri,
            "holdout_sha256": holdout_sha256,
            "params": trained.params,
            "metrics": trained.metrics,
            "data_hash": trained.data_hash,
            "rows": trained.rows,
            "feature_stats": trained.feature_stats,
            "package_versions": trained.package_versions,
            "code_version": trained.code_version,
            "training_data": {
                "query": (
                    f"models.training.build_labels(clicks, [{span.start_ms}, {span.end_ms})) joined "
                    f"point-in-time (bitemporal={settings.batch.training_bitemporal}) to "
                    f"{', '.join(stored_refs(trained.pipeline))}; table "
                    f"{warehouse.path(TRAINING_SETS, window.key, model=name)}"
                ),
                "start_ms": span.start_ms,
                "end_ms": span.end_ms,
                "rows": trained.rows,
                "data_hash": trained.data_hash,
            },
        }
        warehouse.write_json(MODELS, window.key, summary, model=name)
        return MaterializeResult(
            metadata={
                "sha256": sha256,
                "artifact_uri": uri,
                "rows": trained.rows,
                "data_hash": trained.data_hash,
                "params": MetadataValue.json(trained.params),
                **{f"train {k}": float(v) for k, v in trained.metrics.items()},
            }
        )

    @daily_asset(
        partitions,
        key=[name, "evaluation"],
        deps=[model],
        kinds={"sklearn"},
        description=f"{name}: the candidate and the production version scored on the candidate's holdout.",
        **common,
    )
    def evaluation(context: AssetExecutionContext) -> MaterializeResult[Any]:
        settings, window = settings_of(context), window_of(context)
        warehouse = Warehouse(settings)
        info = warehouse.read_json(MODELS, window.key, model=name, needed_by=f"{name}/evaluation")
        store = open_artifact_store(settings)
        holdout = pd.read_parquet(io.BytesIO(store.get(info["holdout_uri"], info["holdout_sha256"])))
        candidate = load_pipeline(store.get(info["artifact_uri"], info["artifact_sha256"]), repository)
        result: dict[str, Any] = {
            "window": window.key,
            "holdout_rows": len(holdout),
            "candidate_sha256": info["artifact_sha256"],
            "candidate": candidate.evaluate(holdout),
            "production_version": None,
            "production": None,
        }
        with Registry(settings, actor="dagster") as registry:
            try:
                production = registry.resolve(f"{name}@production")
            except NotFoundError:
                production = None
            if production is not None:
                incumbent = load_pipeline(registry.load_artifact(production), repository)
                result["production_version"] = production.version
                result["production"] = incumbent.evaluate(holdout)
        warehouse.write_json(EVALUATIONS, window.key, result, model=name)
        metadata: dict[str, Any] = {
            "holdout_rows": len(holdout),
            "production_version": result["production_version"] or 0,
        }
        for who in ("candidate", "production"):
            for metric, value in (result[who] or {}).items():
                metadata[f"{who} {metric}"] = float(value)
        return MaterializeResult(metadata=metadata)

    return [
        training_set,
        model,
        evaluation,
        build_registration_asset(spec, repository, partitions, evaluation, common),
        build_prediction_asset(spec, repository, partitions, common),
    ]


def _training_frame(context: AssetCheckExecutionContext, spec: ModelSpec) -> pd.DataFrame:
    settings, window = settings_of(context), window_of(context)
    path = Warehouse(settings).path(TRAINING_SETS, window.key, model=spec.name)
    if not path.is_file():
        return pd.DataFrame()
    return pd.read_parquet(path)


def build_model_checks(spec: ModelSpec, partitions: DailyPartitionsDefinition) -> list[AssetChecksDefinition]:
    common: dict[str, Any] = {
        "asset": AssetKey([spec.name, "training_set"]),
        "blocking": True,
        "partitions_def": partitions,
        "required_resource_keys": {RESOURCE_KEY},
    }
    what = f"the {spec.name} training set"

    @asset_check(name="rows", description="The training window has labelled rows.", **common)
    def rows(context: AssetCheckExecutionContext) -> AssetCheckResult:
        frame = _training_frame(context, spec)
        return check_result(quality.training_rows(what, len(frame), settings_of(context).batch.min_rows))

    @asset_check(
        name="missing_values",
        description="Per day of the window, each feature has a value in enough rows "
        "(features with a default in the spec are sparse by declaration and not checked).",
        **common,
    )
    def missing_values(context: AssetCheckExecutionContext) -> AssetCheckResult:
        frame = _training_frame(context, spec)
        # Stored refs are <feature set>:<feature>. A feature the spec gives a default (e.g. the
        # best position a user clicked: most users never click) is missing by design.
        features = [c for c in frame.columns if ":" in c and c not in spec.defaults]
        if not frame.empty:
            days = pd.to_datetime(frame[LABEL_TIME] + 1, unit="ms", utc=True).dt.strftime("%Y-%m-%d")
            frame = frame.assign(_day=days)
        limit = settings_of(context).batch.feature_max_missing_share
        return check_result(quality.feature_missing_values(what, frame, features, "_day", limit))

    @asset_check(
        name="label_balance",
        description="Positive labels are present and their share is within bounds.",
        **common,
    )
    def label_balance(context: AssetCheckExecutionContext) -> AssetCheckResult:
        frame = _training_frame(context, spec)
        batch = settings_of(context).batch
        if frame.empty:
            return check_result(quality.training_rows(what, 0, max(batch.min_rows, 1)))
        return check_result(
            quality.label_balance(
                what, frame[spec.label], min_positives=batch.min_positives, bounds=batch.positive_share_bounds
            )
        )

    return [rows, missing_values, label_balance]
