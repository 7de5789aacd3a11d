"""Feature definitions fail at declaration, naming the problem and listing what is known."""

from __future__ import annotations

from typing import Any

import pytest

from features import (
    ApproxDistinct,
    Count,
    Eq,
    FeatureRepository,
    FeatureSet,
    In,
    Last,
    Max,
    Mean,
    Min,
    Ratio,
    Sum,
    aggregation,
    apply_on_demand,
    on_demand,
)
from features.examples import clickstream
from headwater.errors import ConfigError, HeadwaterError, NotFoundError


def feature_set(**overrides: Any) -> FeatureSet:
    args: dict[str, Any] = {
        "entity": "user_id",
        "source": "clicks",
        "owner": "team@example.com",
        "description": "test features",
        "features": [Count(windows=["1h"])],
    }
    args.update(overrides)
    return FeatureSet("test_set", **args)


def test_unknown_source_topic_lists_topics() -> None:
    with pytest.raises(ConfigError, match=r"unknown source topic 'clikcs'; known topics: clicks, outcomes"):
        feature_set(source="clikcs")


def test_entity_not_in_schema_lists_fields() -> None:
    with pytest.raises(
        ConfigError, match=r"entity 'usr_id' is not a field of click events .*user_id, item_id"
    ):
        feature_set(entity="usr_id")


def test_aggregated_field_not_in_schema_lists_fields() -> None:
    with pytest.raises(ConfigError, match=r"Sum\('price'.*'price' is not a field .* event_time, user_id"):
        feature_set(features=[Sum("price", windows=["1h"])])


@pytest.mark.parametrize("agg", [Sum, Mean, Min, Max])
def test_numeric_aggregations_reject_text_fields(agg: type) -> None:
    with pytest.raises(
        ConfigError, match=r"field item_id is string; \w+ needs int or float fields: .*position"
    ):
        feature_set(features=[agg("item_id", windows=["1h"])])


def test_distinct_rejects_floats_and_maps() -> None:
    with pytest.raises(ConfigError, match="propensity is nullable float"):
        feature_set(features=[ApproxDistinct("propensity", windows=["1h"])])
    with pytest.raises(ConfigError, match="user_features is complex"):
        feature_set(features=[Last("user_features", windows=["1h"])])


def test_unknown_aggregation_lists_known() -> None:
    with pytest.raises(
        ConfigError, match=r"features\[1\] is 'median', not an aggregation; known: Count, Sum"
    ):
        feature_set(features=[Count(windows=["1h"]), "median"])
    with pytest.raises(ConfigError, match="unknown aggregation 'Median'; known: Count, Sum, Mean"):
        aggregation("Median", "position", windows=["1h"])
    assert aggregation("Sum", "position", windows=["1h"]) == Sum("position", windows=["1h"])


@pytest.mark.parametrize("window", ["5 minutes", "0m", "5w", "1.5h", ""])
def test_bad_window_strings(window: str) -> None:
    with pytest.raises(ConfigError, match=r"bad .*window .*unit s, m, h or d"):
        feature_set(features=[Count(windows=[window])])


def test_missing_windows_duplicate_windows_and_names() -> None:
    with pytest.raises(ConfigError, match="give windows"):
        feature_set(features=[Count()])
    with pytest.raises(ConfigError, match="windows '60m' and '1h' are the same"):
        feature_set(features=[Count(windows=["60m", "1h"])])
    with pytest.raises(ConfigError, match="two features are named 'n_1h'"):
        feature_set(features=[Count(windows=["1h"], name="n"), Sum("position", windows=["1h"], name="n")])


def test_filter_values_are_checked_against_the_schema() -> None:
    with pytest.raises(ConfigError, match="'CLICKK' is not a symbol of action; symbols: IMPRESSION, CLICK"):
        feature_set(features=[Count(windows=["1h"], where=Eq("action", "CLICKK"))])
    with pytest.raises(ConfigError, match="'2' does not match field position, which is int"):
        feature_set(features=[Count(windows=["1h"], where=In("position", ["2"]))])
    with pytest.raises(ConfigError, match="'pos' is not a field"):
        feature_set(features=[Count(windows=["1h"], where=Eq("pos", 1))])


def test_other_declaration_errors() -> None:
    with pytest.raises(ConfigError, match="give an owner and a description"):
        feature_set(owner="")
    with pytest.raises(ConfigError, match="feature set name 'Bad-Name'"):
        FeatureSet("Bad-Name", entity="user_id", source="clicks", owner="o", description="d", features=[])
    with pytest.raises(ConfigError, match="lateness"):
        feature_set(lateness="soon")
    with pytest.raises(ConfigError, match="Count or Sum"):
        feature_set(features=[Ratio(Mean("position"), Count(), windows=["1h"])])


def test_feature_names_are_derived_deterministically() -> None:
    fs = feature_set(
        features=[
            Count(windows=["1h"], where=Eq("action", "CLICK")),
            Sum("position", windows=["24h"]),
            Ratio(Count(where=Eq("action", "CLICK")), Count(), windows=["7d"]),
            Count(windows=["5m"], name="events"),
        ]
    )
    assert fs.feature_names == [
        "count_where_action_eq_click_1h",
        "sum_position_24h",
        "ratio_count_where_action_eq_click_over_count_7d",
        "events_5m",
    ]
    assert [f.dtype for f in fs.features] == ["long", "long", "double", "long"]
    assert fs.ttl_ms == 7 * 24 * 3600 * 1000  # defaults to the largest window


def test_on_demand_signature_is_checked_at_declaration() -> None:
    with pytest.raises(
        ConfigError, match=r"takes \(clicks, views\); its inputs feed \(clicks_24h, position\)"
    ):

        @on_demand(inputs=["item_activity:clicks_24h", "position"], outputs={"x": float})
        def bad(clicks: int, views: int) -> float:
            return 0.0

    with pytest.raises(ConfigError, match="outputs map lower-case names to int, float, str, bool"):

        @on_demand(inputs=["position"], outputs={"x": list})
        def bad_type(position: int) -> float:
            return 0.0


def test_apply_on_demand_is_the_same_function_for_serving_and_training() -> None:
    rows = [
        {"item_activity:clicks_24h": 3, "item_activity:impressions_24h": 1000, "position": 2},
        {"clicks_24h": None, "impressions_24h": None, "position": 9},  # bare names, missing values
    ]
    out = apply_on_demand(clickstream.item_ctr, rows)
    prior, strength = clickstream.CTR_PRIOR
    assert out[0]["ctr_smoothed"] == pytest.approx((3 + prior * strength) / (1000 + strength))
    assert out[0]["ctr_at_position"] == pytest.approx(out[0]["ctr_smoothed"] * clickstream.POSITION_FACTOR[2])
    assert out[1]["ctr_smoothed"] == pytest.approx(prior)
    assert out[1]["ctr_at_position"] == out[1]["ctr_smoothed"]  # unknown slot: no adjustment
    assert out[0]["position"] == 2  # inputs are kept
    with pytest.raises(NotFoundError, match="needs input 'position'; the row has"):
        apply_on_demand(clickstream.item_ctr, [{"clicks_24h": 1, "impressions_24h": 2}])


def test_on_demand_outputs_are_type_checked() -> None:
    @on_demand(inputs=["position"], outputs={"label": str})
    def label(position: int) -> int:
        return position

    with pytest.raises(HeadwaterError, match="output label is 2, declared str"):
        apply_on_demand(label, [{"position": 2}])


def test_repository_resolves_refs_and_lists_known_ones() -> None:
    repo = clickstream.repository()
    ref = repo.resolve("user_activity:clicks_1h")
    assert (ref.kind, ref.owner, ref.name, ref.dtype) == ("feature", "user_activity", "clicks_1h", "long")
    assert ref.feature.window_ms == 3600 * 1000
    assert repo.resolve("item_ctr:ctr_smoothed").kind == "on_demand"
    with pytest.raises(
        NotFoundError, match=r"unknown feature ref 'user_activity:clicks_2h' \(did you mean .*Known: "
    ):
        repo.resolve("user_activity:clicks_2h")
    with pytest.raises(NotFoundError) as info:
        repo.resolve_many(["user_activity:clicks_1h", "nope:x", "item_activity:ctr_1h"])
    assert "'nope:x'" in str(info.value) and "item_activity:distinct_users_24h" in str(info.value)
    with pytest.raises(
        NotFoundError, match="unknown feature set 'users'; known: user_activity, item_activity"
    ):
        repo.feature_set("users")


def test_repository_checks_transform_inputs_and_names() -> None:
    @on_demand(inputs=["user_activity:clicks_2h"], outputs={"y": float})
    def needs_unknown(clicks_2h: int) -> float:
        return 1.0

    with pytest.raises(
        ConfigError, match=r"unknown feature ref 'user_activity:clicks_2h'.*Known: user_activity"
    ):
        FeatureRepository([clickstream.user_activity], on_demand=[needs_unknown])
    with pytest.raises(ConfigError, match="already has a feature set or transform named 'user_activity'"):
        FeatureRepository([clickstream.user_activity, clickstream.user_activity])
