"""The registry's fold and gate, pure: records in, state and decisions out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from headwater.errors import ConfigError, NotFoundError
from registry.gate import Policy, check_promotion, policy_from_spec
from registry.state import RegistryState, parse_ref
from streams.topics import TopicCatalog, TopicSpec

_ids = iter(range(1_000_000))


def ev(kind: str, version: int, *, alias: str | None = None, prev: int | None = None, t: int = 0,
       meta: dict[str, Any] | None = None, name: str = "ctr", **kw: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "event_id": f"e{next(_ids)}", "event_time": t or 1_000 + version, "model_name": name, "kind": kind,
        "version": version, "alias": alias, "previous_version": prev,
        "artifact_uri": f"file:///a/{version}", "artifact_sha256": f"{version:064x}",
        "feature_refs": ["u:clicks"],
        "metrics": {"roc_auc": 0.5 + version / 100},
        "metadata": {k: json.dumps(v) for k, v in (meta or {}).items()}, "actor": "t", "reason": None,
        "forced": False, **kw,
    }  # fmt: skip


def promoted(state: RegistryState, version: int, alias: str = "production", **kw: Any) -> dict[str, Any]:
    record = ev("ALIAS_MOVED", version, alias=alias, prev=state.alias("ctr", alias), **kw)
    state.apply(record)
    return record


def test_fold_versions_metadata_and_resolve() -> None:
    state = RegistryState(
        [ev("VERSION_REGISTERED", v, meta={"owner": "ml", "params": {"lr": 0.1}}) for v in (1, 2, 3)]
    )
    assert [v.version for v in state.versions("ctr")] == [1, 2, 3]
    mv = state.version("ctr", 2)
    assert mv.metadata == {"owner": "ml", "params": {"lr": 0.1}}  # JSON strings parsed
    assert mv.metrics == {"roc_auc": 0.52} and mv.registered_at == 1_002 and not mv.archived
    promoted(state, 2)
    promoted(state, 3, alias="staging")
    assert state.resolve("ctr").version == 2  # bare name = production
    assert state.resolve("ctr@staging").version == 3
    assert state.resolve("ctr:1").version == 1
    assert state.next_version("ctr") == 4 and state.next_version("other") == 1
    assert state.aliases("ctr") == {"production": 2, "staging": 3}


def test_unknown_names_say_what_is_known() -> None:
    state = RegistryState([ev("VERSION_REGISTERED", 1), ev("VERSION_REGISTERED", 2)])
    with pytest.raises(NotFoundError, match=r"unknown model 'nope'; known models: ctr"):
        state.resolve("nope:1")
    with pytest.raises(NotFoundError, match=r"no version 7; versions: 1, 2"):
        state.resolve("ctr:7")
    promoted(state, 1, alias="staging")
    with pytest.raises(NotFoundError, match=r"no alias 'production'; aliases: staging -> 1"):
        state.resolve("ctr")
    with pytest.raises(ConfigError, match="bad model reference"):
        parse_ref("ctr:x")


def test_replayed_event_changes_nothing() -> None:
    state = RegistryState()
    first = ev("VERSION_REGISTERED", 1)
    state.apply(first)
    move = promoted(state, 1)
    state.apply(move)  # a restore or a re-read delivers it again
    assert len(state.alias_history("ctr", "production")) == 1 and state.events == 2


def test_rollback_walks_back_the_alias_history() -> None:
    state = RegistryState([ev("VERSION_REGISTERED", v) for v in (1, 2, 3)])
    for v in (1, 2, 3):
        promoted(state, v)
    assert state.rollback_target("ctr", "production") == 2
    promoted(state, 2, meta={"rollback": True}, reason="bad latency")
    assert state.alias("ctr", "production") == 2
    assert state.rollback_target("ctr", "production") == 1  # twice back: the first version
    last = state.alias_history("ctr", "production")[-1]
    assert last.rollback and last.previous_version == 3 and last.reason == "bad latency"
    promoted(state, 1, meta={"rollback": True})
    assert state.rollback_target("ctr", "production") is None


def test_rollback_skips_archived_versions() -> None:
    state = RegistryState([ev("VERSION_REGISTERED", v) for v in (1, 2, 3)])
    for v in (1, 2, 3):
        promoted(state, v)
    state.apply(ev("VERSION_ARCHIVED", 2))
    assert state.rollback_target("ctr", "production") == 1


def test_earlier_versions_are_what_rollbacks_would_return_to_newest_first() -> None:
    state = RegistryState([ev("VERSION_REGISTERED", v) for v in (1, 2, 3, 4, 5)])
    for v in (1, 2, 1, 3, 4):
        promoted(state, v)
    assert state.earlier_versions("ctr", "production") == [3, 1, 2]  # each once, newest first
    promoted(state, 5)
    promoted(state, 4, meta={"rollback": True})  # 5 was rolled back from: never a fallback
    assert state.alias("ctr", "production") == 4
    assert state.earlier_versions("ctr", "production") == [3, 1, 2]
    state.apply(ev("VERSION_ARCHIVED", 1))
    assert state.earlier_versions("ctr", "production") == [3, 2]
    assert state.earlier_versions("ctr", "staging") == []
    assert state.earlier_versions("other", "production") == []


def test_fold_after_compaction_keeps_what_matters() -> None:
    """Only the last record per key survives compaction: the archive event and the last move."""
    archived = ev("VERSION_ARCHIVED", 1, meta={"registered_at": 5, "owner": "ml"})
    state = RegistryState([archived, ev("VERSION_REGISTERED", 2), ev("VERSION_REGISTERED", 3),
                           ev("ALIAS_MOVED", 3, alias="production", prev=2)])  # fmt: skip
    v1 = state.version("ctr", 1)
    assert v1.archived and v1.registered_at == 5 and v1.metadata == {"owner": "ml"}
    assert v1.artifact_sha256 == f"{1:064x}"
    assert state.alias("ctr", "production") == 3 and state.rollback_target("ctr", "production") == 2


def test_shadows_and_cooldown_clock() -> None:
    state = RegistryState([ev("VERSION_REGISTERED", v) for v in (1, 2, 3)])
    assert state.last_promotion_ms("ctr", "production") is None
    promoted(state, 1, t=50_000)
    assert state.last_promotion_ms("ctr", "production") == 50_000
    state.apply(ev("SHADOW_ATTACHED", 2, alias="production"))
    state.apply(ev("SHADOW_ATTACHED", 3, alias="production"))
    state.apply(ev("SHADOW_DETACHED", 2, alias="production"))
    assert state.shadows("ctr", "production") == [3]
    assert state.all_shadows("ctr") == {"production": [3]}


def test_shadow_keys_do_not_collide_with_alias_keys() -> None:
    from headwater.settings import load_settings

    spec: TopicSpec = TopicCatalog(load_settings()).spec("models")
    keys = {
        spec.key(ev("VERSION_REGISTERED", 2)),
        spec.key(ev("VERSION_ARCHIVED", 2)),
        spec.key(ev("ALIAS_MOVED", 2, alias="production")),
        spec.key(ev("SHADOW_ATTACHED", 2, alias="production")),
        spec.key(ev("SHADOW_ATTACHED", 3, alias="production")),
    }
    assert keys == {"ctr:2", "ctr@production", "ctr@production#shadow:2", "ctr@production#shadow:3"}
    assert spec.key(ev("SHADOW_DETACHED", 2, alias="production")) == "ctr@production#shadow:2"


# --- the gate -------------------------------------------------------------------------------------


def decide(policy: Policy, cand: float, inc: float | None, last: int | None = None, now: int = 10_000_000):  # type: ignore[no-untyped-def]
    scores = None if inc is None else (lambda _metric: (cand, inc))
    return check_promotion(policy, target="ctr@production", last_move_ms=last, now_ms=now, scores=scores)


def test_gate_compares_in_the_metric_direction_with_margin() -> None:
    auc = Policy("roc_auc", min_improvement=0.01)
    assert decide(auc, 0.75, 0.70).allowed
    refused = decide(auc, 0.705, 0.70)
    assert not refused.allowed and "0.705" in refused.message and "0.7 " in refused.message
    assert not decide(Policy("roc_auc"), 0.70, 0.70).allowed  # equal never beats
    loss = Policy("log_loss", min_improvement=0.01, higher_is_better=False)
    assert decide(loss, 0.30, 0.35).allowed and not decide(loss, 0.35, 0.30).allowed
    assert decide(auc, 0.1, None).allowed  # first promotion: nothing to beat


def test_gate_cooldown_is_checked_before_scoring() -> None:
    def explode(_metric: str) -> tuple[float, float]:
        raise AssertionError("scored during a cooldown")

    policy = Policy("roc_auc", cooldown_s=3600)
    d = check_promotion(
        policy, target="ctr@production", last_move_ms=10_000_000 - 600_000, now_ms=10_000_000, scores=explode
    )
    assert not d.allowed and "cooldown is 3600s, 3000s left" in d.message
    assert decide(policy, 0.8, 0.7, last=10_000_000 - 3_600_000).allowed


def test_policy_from_spec() -> None:
    p = policy_from_spec({"metric": "rmse", "promotion": {"min_improvement": 0.5, "cooldown_s": 60}})
    assert p == Policy("rmse", 0.5, 60.0, higher_is_better=False)
    assert (
        policy_from_spec({"metric": "roc_auc", "promotion": {"metric": "average_precision"}}).metric
        == "average_precision"
    )
    with pytest.raises(ConfigError, match="no promotion metric"):
        policy_from_spec({})
    assert policy_from_spec({}, require_metric=False).metric == ""
