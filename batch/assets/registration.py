"""``<model>/registered_model``: the trained candidate into the registry, staging, then production.

1. **Register** the artifact with its metadata (training data reference, params, metrics,
   package and code versions, owner, feature statistics, holdout): idempotent on the
   artifact's sha256, so re-running a partition registers nothing new.
2. **Staging** always points at the newest candidate (only ``settings.registry.gated_aliases``,
   production by default, go through the gate).
3. **Production** goes through the promotion gate (:meth:`registry.Registry.promote` with
   the holdout evaluator): the candidate must beat the production version on its holdout by
   the spec's margin, outside the cooldown. The first version has no incumbent and passes.
   A refusal is the gate doing its job, not a failure of the run: it is reported in the
   materialization's metadata (``promoted: false`` and the gate's reason).
"""

import logging
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    DailyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
)

from batch.assets.common import Warehouse, daily_asset, settings_of, window_of
from batch.assets.models import MODELS
from features.repository import FeatureRepository
from models.spec import ModelSpec
from registry import PromotionRefused, Registry, holdout_evaluator, open_artifact_store

__all__ = ["build_registration_asset", "registration_metadata"]

log = logging.getLogger(__name__)

PRODUCTION, STAGING = "production", "staging"


def registration_metadata(spec: ModelSpec, summary: dict[str, Any]) -> dict[str, Any]:
    """The registry metadata of a version trained by the ``model`` asset (keys of the contract)."""
    return {
        "params": summary["params"],
        "training_data": summary["training_data"],
        "package_versions": summary["package_versions"],
        "code_version": summary["code_version"],
        "owner": spec.owner,
        "contact": spec.contact,
        "description": spec.description,
        "consumers": list(spec.consumers),
        "feature_stats": summary["feature_stats"],
        "holdout_uri": summary["holdout_uri"],
        "holdout_sha256": summary["holdout_sha256"],
        "spec": spec.model_dump(mode="json"),
        "trained_by": f"dagster {summary['window']}",
    }


def build_registration_asset(
    spec: ModelSpec,
    repository: FeatureRepository,
    partitions: DailyPartitionsDefinition,
    evaluation: AssetsDefinition,
    common: dict[str, Any],
) -> AssetsDefinition:
    name = spec.name

    @daily_asset(
        partitions,
        key=[name, "registered_model"],
        deps=[evaluation],
        kinds={"kafka"},
        description=f"{name}'s candidate registered (models topic), moved to staging, and promoted to "
        "production if it passes the gate.",
        **common,
    )
    def registered_model(context: AssetExecutionContext) -> MaterializeResult[Any]:
        settings, window = settings_of(context), window_of(context)
        summary = Warehouse(settings).read_json(
            MODELS, window.key, model=name, needed_by=f"{name}/registered_model"
        )
        artifact = open_artifact_store(settings).get(summary["artifact_uri"], summary["artifact_sha256"])
        metadata: dict[str, Any] = {}
        with Registry(settings, actor="dagster") as registry:
            mv = registry.register(
                name,
                artifact,
                feature_refs=list(spec.features),
                metrics=summary["metrics"],
                metadata=registration_metadata(spec, summary),
            )
            with registry.view() as state:
                staging, production = state.alias(name, STAGING), state.alias(name, PRODUCTION)
            if staging != mv.version:
                registry.promote(name, mv.version, STAGING)
            if production == mv.version:
                metadata.update(promoted=True, gate="already production")
            else:
                try:
                    registry.promote(
                        name, mv.version, PRODUCTION, evaluator=holdout_evaluator(registry, repository)
                    )
                    metadata.update(promoted=True, gate="passed")
                except PromotionRefused as refused:
                    log.info("%s: %s", name, refused)
                    metadata.update(promoted=False, gate=str(refused))
            with registry.view() as state:
                production = state.alias(name, PRODUCTION)
        return MaterializeResult(
            metadata={
                "version": mv.version,
                "sha256": mv.artifact_sha256,
                "production_version": production or 0,
                **metadata,
                "artifact_uri": MetadataValue.path(mv.artifact_uri),
            }
        )

    return registered_model
