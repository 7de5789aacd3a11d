"""The registry on the real broker: events on the compacted models topic, read back by every reader."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from batch.offline_store import open_offline_store
from headwater.errors import ConfigError, HeadwaterError, NotFoundError
from headwater.settings import Settings
from processors.lake import LakeWriter
from processors.worker import run_processors
from registry import ArtifactIntegrityError, PromotionRefused, Registry
from registry.gate import Policy
from streams.serde import Serde
from streams.state import CompactedState
from tests.registry.conftest import SPEC, Fitted, evaluator, register


def topic_records(settings: Settings, serde: Serde) -> dict[str, dict]:  # type: ignore[type-arg]
    with CompactedState(settings, serde, "models") as state:
        return state.wait_until_caught_up().snapshot()


def test_register_is_idempotent_and_numbers_versions(registry: Registry, fitted: Fitted) -> None:
    v1 = register(registry, fitted.weak, fitted, owner="ml-team")
    v2 = register(registry, fitted.strong, fitted)
    assert (v1.version, v2.version) == (1, 2)
    again = register(registry, fitted.weak, fitted)
    assert again.version == 1 and again.artifact_sha256 == v1.artifact_sha256
    assert [v.version for v in registry.state.versions("cancer")] == [1, 2]
    assert v1.metadata["owner"] == "ml-team" and v1.metadata["spec"] == SPEC  # JSON round trip
    assert registry.load_artifact(v1) == fitted.weak


def test_promotion_gate_on_real_models(
    registry: Registry, fitted: Fitted, settings: Settings, serde: Serde
) -> None:
    assert fitted.strong_auc > fitted.weak_auc + 0.01  # the data makes the comparison meaningful
    weak, strong = register(registry, fitted.weak, fitted), register(registry, fitted.strong, fitted)
    evaluate = evaluator(registry)
    registry.promote("cancer", strong.version, evaluator=evaluate)  # first: nothing to beat
    with pytest.raises(PromotionRefused) as refused:
        registry.promote("cancer", weak.version, evaluator=evaluate)
    message = str(refused.value)
    assert "does not beat cancer@production" in message
    assert f"{fitted.weak_auc:.6g}" in message and f"{fitted.strong_auc:.6g}" in message  # both scores
    assert registry.resolve("cancer").version == strong.version

    # Staging is not gated by default: any version moves there.
    registry.promote("cancer", weak.version, "staging")
    assert registry.resolve("cancer@staging").version == weak.version
    # Gated, the better one wins over the weaker incumbent.
    gated = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"gated_aliases": ("production", "staging")})}
    )
    with Registry(gated, serde) as strict:
        with pytest.raises(ConfigError, match="needs an evaluator"):
            strict.promote("cancer", strong.version, "staging")
        strict.promote("cancer", strong.version, "staging", evaluator=evaluator(strict))
        move = strict.state.alias_history("cancer", "staging")[-1]
    assert move.previous_version == weak.version and not move.forced
    gate = move.metadata["gate"]
    assert gate["candidate_score"] == pytest.approx(fitted.strong_auc)
    assert gate["incumbent_score"] == pytest.approx(fitted.weak_auc)

    # Cooldown per model and alias since the last move, before any scoring.
    cool = Policy("roc_auc", min_improvement=0.0, cooldown_s=3600)
    with pytest.raises(PromotionRefused, match=r"cancer@production moved \d+s ago; cooldown is 3600s"):
        registry.promote("cancer", weak.version, policy=cool, evaluator=evaluate)

    # Force needs a reason; with one, it is recorded in the event on the topic.
    with pytest.raises(PromotionRefused, match="needs a reason"):
        registry.promote("cancer", weak.version, force=True, reason="  ")
    registry.promote("cancer", weak.version, force=True, reason="incident 42: strong model misbehaves")
    record = topic_records(settings, serde)["cancer@production"]
    assert record["kind"] == "ALIAS_MOVED" and record["version"] == weak.version
    assert record["forced"] is True and record["reason"] == "incident 42: strong model misbehaves"
    assert record["previous_version"] == strong.version and record["actor"] == "test"


def test_rollback_is_one_call_and_recorded(
    registry: Registry, fitted: Fitted, settings: Settings, serde: Serde
) -> None:
    weak, strong = register(registry, fitted.weak, fitted), register(registry, fitted.strong, fitted)
    registry.promote("cancer", weak.version)
    registry.promote("cancer", strong.version, evaluator=evaluator(registry))
    with pytest.raises(HeadwaterError, match="needs a reason"):
        registry.rollback("cancer", reason="")
    back = registry.rollback("cancer", reason="latency regression")
    assert back.version == weak.version and registry.resolve("cancer@production").version == weak.version
    record = topic_records(settings, serde)["cancer@production"]
    assert (record["version"], record["previous_version"], record["reason"]) == (1, 2, "latency regression")
    assert record["metadata"]["rollback"] == "true"
    with pytest.raises(NotFoundError, match="no earlier version to roll back to"):
        registry.rollback("cancer", reason="again")
    with pytest.raises(NotFoundError, match="no alias 'staging' to roll back"):
        registry.rollback("cancer", "staging", reason="x")


def test_archive_and_shadows(registry: Registry, fitted: Fitted, settings: Settings, serde: Serde) -> None:
    weak, strong = register(registry, fitted.weak, fitted), register(registry, fitted.strong, fitted)
    registry.promote("cancer", weak.version)
    with pytest.raises(HeadwaterError, match="is what cancer@production points at"):
        registry.archive("cancer", weak.version)
    registry.attach_shadow("cancer", "production", strong.version)
    assert registry.state.shadows("cancer", "production") == [strong.version]
    with pytest.raises(HeadwaterError, match="detach the shadow first"):
        registry.archive("cancer", strong.version)
    registry.detach_shadow("cancer", "production", strong.version)
    assert registry.state.shadows("cancer", "production") == []
    archived = registry.archive("cancer", strong.version, reason="superseded")
    assert archived.archived
    with pytest.raises(PromotionRefused, match="archived and cannot be promoted"):
        registry.promote("cancer", strong.version, force=True, reason="try anyway")
    keys = set(topic_records(settings, serde))
    assert {"cancer:1", "cancer:2", "cancer@production", "cancer@production#shadow:2"} <= keys


def test_a_fresh_registry_rebuilds_the_same_view(settings: Settings, serde: Serde, fitted: Fitted) -> None:
    with Registry(settings, serde, actor="writer") as writer:
        weak, strong = register(writer, fitted.weak, fitted), register(writer, fitted.strong, fitted)
        writer.promote("cancer", weak.version)
        writer.promote("cancer", strong.version, "staging")
    with Registry(settings, serde, actor="reader") as reader:  # another process's view, from the topic
        assert [v.version for v in reader.state.versions("cancer")] == [1, 2]
        assert reader.state.aliases("cancer") == {"production": 1, "staging": 2}
        assert reader.resolve("cancer@staging").artifact_sha256 == strong.artifact_sha256
        assert reader.load_artifact(reader.resolve("cancer")) == fitted.weak
        # ... and its own writes continue the numbering.
        assert register(reader, b"third model", fitted).version == 3


def test_tampered_artifact_is_refused(registry: Registry, fitted: Fitted) -> None:
    mv = register(registry, fitted.strong, fitted)
    path = Path(mv.artifact_uri.removeprefix("file://"))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=mv.artifact_sha256):
        registry.load_artifact(registry.resolve("cancer:1"))


def test_lineage(registry: Registry, fitted: Fitted, settings: Settings, serde: Serde) -> None:
    training = {"query": "SELECT ...", "start_ms": 1, "end_ms": 2, "rows": 569, "data_hash": "abc"}
    mv = registry.register(
        "ctr", b"ctr model", feature_refs=["user_activity:clicks_1h", "item_ctr:ctr_smoothed"],
        metadata={"training_data": training, "consumers": ["web-shop"], "code_version": "deadbeef"},
    )  # fmt: skip
    registry.register("other", b"other model", feature_refs=["item_activity:views_1h"])
    assert [v.ref for v in registry.versions_using("user_activity:clicks_1h")] == ["ctr:1"]
    assert [v.ref for v in registry.versions_using("item_activity")] == ["other:1"]
    assert registry.versions_using("user_activity:nope") == []
    trained = registry.trained_on("ctr", mv.version)
    assert trained["training_data"] == training and trained["code_version"] == "deadbeef"
    assert registry.consumers("ctr") == ["web-shop"]
    # Clients seen in the archived predictions are consumers too.
    prediction = {
        "prediction_id": "p1", "event_time": 1, "model_name": "ctr", "model_version": 1, "model_ref": "ctr",
        "entity_key": "u1", "client_id": "mobile-app", "features": [], "score": 0.5, "label": None,
        "ranked_items": [], "experiment_id": None, "variant": None, "propensity": None, "latency_us": 10,
        "shadow": False, "trace_id": None,
    }  # fmt: skip
    LakeWriter(settings, serde.catalog).write("predictions", [(0, 0, prediction)])
    assert registry.consumers("ctr") == ["mobile-app", "web-shop"]
    assert registry.consumers("other") == []


def test_registry_events_are_queryable_in_the_offline_store(
    registry: Registry, fitted: Fitted, settings: Settings
) -> None:
    weak = register(registry, fitted.weak, fitted)
    registry.promote("cancer", weak.version, force=True, reason="bootstrap")
    run_processors(settings, ["lake-sink"], threading.Event(), until_caught_up=True)
    with open_offline_store(settings) as store:
        rows = store.query(
            "SELECT kind, version, alias, forced, reason, _key, metadata['owner'] AS owner FROM models "
            "WHERE model_name = {name:String} ORDER BY _offset",
            {"name": "cancer"},
        ).to_pylist()
    assert [(r["kind"], r["version"], r["alias"], r["forced"], r["reason"], r["_key"]) for r in rows] == [
        ("VERSION_REGISTERED", 1, None, False, None, "cancer:1"),
        ("ALIAS_MOVED", 1, "production", True, "bootstrap", "cancer@production"),
    ]
