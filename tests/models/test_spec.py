"""Spec validation: bad refs, estimators and metrics fail when the spec is declared or loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from features.repository import FeatureRepository
from headwater.errors import ConfigError, NotFoundError
from headwater.settings import load_settings
from models.spec import ModelSpec, SearchSpec, load_specs, stored_reads

BASE: dict[str, Any] = {
    "name": "m",
    "entity_keys": ("user_id", "item_id"),
    "features": ("user_activity:clicks_7d", "item_ctr:ctr_at_position"),
    "request_features": ("position",),
    "label": "clicked",
    "task": "classification",
    "estimator": "logistic_regression",
    "owner": "team@x",
}

# Specs for load_specs tests, importable as "tests.models.test_spec:..."
BAD_REF_SPECS = [ModelSpec(**{**BASE, "features": ("user_activity:clicks_77d",)})]


def test_an_unknown_ref_fails_listing_the_known_refs(repository: FeatureRepository) -> None:
    spec = ModelSpec(**{**BASE, "features": ("user_activity:clicks_77d", "item_ctr:ctr_at_position")})
    with pytest.raises(NotFoundError) as err:
        spec.validate_against(repository)
    message = str(err.value)
    assert "model spec 'm'" in message and "user_activity:clicks_77d" in message
    assert (
        "known:" in message and "user_activity:clicks_7d" in message and "item_ctr:ctr_at_position" in message
    )


def test_load_specs_validates_against_the_settings_repository(tmp_path: Path) -> None:
    specs = load_specs(load_settings(data_dir=tmp_path))
    assert [s.name for s in specs] == ["ctr_model", "ctr_linear"]
    bad = load_settings(data_dir=tmp_path, batch={"model_specs": "tests.models.test_spec:BAD_REF_SPECS"})
    with pytest.raises(NotFoundError, match=r"known: .*user_activity:clicks_7d"):
        load_specs(bad)
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_specs(load_settings(data_dir=tmp_path, batch={"model_specs": "tests.models.nowhere:specs"}))


def test_unknown_estimator_and_metric_name_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown estimator 'xgboost'; known: logistic_regression, .*kmeans"
    ):
        ModelSpec(**{**BASE, "estimator": "xgboost"})
    with pytest.raises(ConfigError, match=r"unknown metric .auc.*roc_auc"):
        ModelSpec(**{**BASE, "metric": "auc"})
    with pytest.raises(ConfigError, match=r"does not apply to classification.*roc_auc"):
        ModelSpec(**{**BASE, "metric": "rmse"})
    with pytest.raises(ConfigError, match="does not do regression; use linear_regression"):
        ModelSpec(**{**BASE, "task": "regression", "metric": "rmse"})
    with pytest.raises(ConfigError, match="unknown metric"):
        ModelSpec(**{**BASE, "promotion": {"metric": "nope"}})


def test_other_declaration_errors() -> None:
    with pytest.raises(ConfigError, match="lower case"):
        ModelSpec(**{**BASE, "name": "Bad-Name"})
    with pytest.raises(ConfigError, match="label 'position' is also a feature"):
        ModelSpec(**{**BASE, "label": "position"})
    with pytest.raises(ConfigError, match="not features"):
        ModelSpec(**{**BASE, "defaults": {"user_activity:clicks_1h": 0}})
    with pytest.raises(ConfigError, match="rank_key 'sku' is not an entity key"):
        ModelSpec(**{**BASE, "post": {"kind": "rank", "rank_key": "sku"}})
    with pytest.raises(ConfigError, match="search space 'C'"):
        SearchSpec(method="grid", space={"C": {"low": 1, "high": 2}})


def test_string_features_and_missing_entity_keys_are_refused(repository: FeatureRepository) -> None:
    strings = ModelSpec(**{**BASE, "features": ("user_activity:last_clicked_item_7d",)})
    with pytest.raises(ConfigError, match="last_clicked_item_7d'] are not numeric"):
        strings.validate_against(repository)
    # item_ctr reads item_activity, keyed by item_id: the spec must name that key.
    no_item = ModelSpec(**{**BASE, "entity_keys": ("user_id",)})
    with pytest.raises(ConfigError, match="keyed by 'item_id'"):
        no_item.validate_against(repository)


def test_stored_reads_include_on_demand_inputs(repository: FeatureRepository) -> None:
    spec = ModelSpec(**BASE)
    assert stored_reads(spec, repository) == {
        "user_activity": ["clicks_7d"],
        "item_activity": ["clicks_24h", "impressions_24h"],
    }
    assert spec.group_key == "user_id" and spec.promotion_metric == "roc_auc"


def test_a_spec_round_trips_through_json(example_specs: dict[str, ModelSpec]) -> None:
    for spec in example_specs.values():
        assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
