"""The promotion gate applies the incumbent's policy too, stricter-wins: pure cases, then the real
registry on the real broker with real models scored on a real holdout."""

from __future__ import annotations

import pytest
import skops.io as sio
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

from registry import PromotionRefused, Registry, load_holdout
from registry.gate import Policy, check_promotion, promotion_policies
from tests.registry.conftest import SPEC, Fitted, evaluator, register, score

NOW = 10_000_000_000


def spec(metric: str = "roc_auc", *, margin: float = 0.0, cooldown: float = 0.0) -> dict[str, object]:
    return {"name": "ctr", "metric": metric, "promotion": {"min_improvement": margin, "cooldown_s": cooldown}}


def test_merged_policy_takes_the_longer_cooldown_and_the_larger_margin() -> None:
    [merged] = promotion_policies(spec(cooldown=0), spec(cooldown=3600, margin=0.02))
    assert merged == Policy("roc_auc", min_improvement=0.02, cooldown_s=3600.0)
    [merged] = promotion_policies(spec(cooldown=7200, margin=0.05), spec(cooldown=60, margin=0.01))
    assert merged == Policy("roc_auc", min_improvement=0.05, cooldown_s=7200.0)
    # Different metrics: both are compared, each with its own margin and direction, one cooldown.
    auc, loss = promotion_policies(spec(margin=0.01), spec("log_loss", margin=0.03, cooldown=600))
    assert auc == Policy("roc_auc", 0.01, 600.0, higher_is_better=True)
    assert loss == Policy("log_loss", 0.03, 600.0, higher_is_better=False)
    # An incumbent registered without a spec still brings nothing stricter, and breaks nothing.
    assert promotion_policies(spec(cooldown=5), None, has_incumbent=True) == (Policy("roc_auc", 0, 5.0),)
    # No incumbent: the candidate's policy alone (a first promotion needs no metric).
    assert promotion_policies({}, None) == (Policy("", cooldown_s=0.0),)
    # An explicit override replaces the candidate's policy, never the incumbent's.
    override = Policy("roc_auc", min_improvement=0.0, cooldown_s=0)
    [merged] = promotion_policies(spec(), spec(cooldown=3600), override)
    assert merged.cooldown_s == 3600.0


def test_incumbent_cooldown_holds_against_a_candidate_without_one() -> None:
    policies = promotion_policies(spec(cooldown=0), spec(cooldown=3600))
    scored: list[str] = []

    def scores(metric: str) -> tuple[float, float]:
        scored.append(metric)
        return 0.9, 0.7

    moved = NOW - 600_000  # ten minutes ago
    d = check_promotion(policies, target="ctr@production", last_move_ms=moved, now_ms=NOW, scores=scores)
    assert not d.allowed and "cooldown is 3600s, 3000s left" in d.message
    assert scored == []  # nothing is scored during a cooldown
    d = check_promotion(
        policies, target="ctr@production", last_move_ms=NOW - 3_600_000, now_ms=NOW, scores=scores
    )
    assert d.allowed and scored == ["roc_auc"]


def test_every_metric_of_the_two_policies_must_pass() -> None:
    policies = promotion_policies(spec(margin=0.01), spec("log_loss", margin=0.05))
    # Better AUC by 0.05, log loss lower by only 0.01 where the incumbent's policy asks 0.05.
    table = {"roc_auc": (0.80, 0.75), "log_loss": (0.40, 0.41)}
    d = check_promotion(policies, target="ctr@production", last_move_ms=None, now_ms=NOW, scores=table.get)  # type: ignore[arg-type]
    assert not d.allowed
    assert "log_loss" in d.message and "required >= 0.05" in d.message and "roc_auc" not in d.message
    assert d.scores == table and (d.candidate_score, d.incumbent_score) == (0.80, 0.75)
    table["log_loss"] = (0.30, 0.41)
    d = check_promotion(policies, target="ctr@production", last_move_ms=None, now_ms=NOW, scores=table.get)  # type: ignore[arg-type]
    assert d.allowed and "roc_auc" in d.message and "log_loss" in d.message


@pytest.fixture(scope="module")
def one_feature_models() -> list[bytes]:
    """More real versions (registering the same artifact twice returns the same version): logistic
    regressions on one feature each, trained as conftest's weak model is."""
    data, y = load_breast_cancer(return_X_y=True, as_frame=True)
    x = data.iloc[:400, :10]
    x.columns = [c.replace(" ", "_") for c in x.columns]
    return [sio.dumps(LogisticRegression(max_iter=500).fit(x.iloc[:, [i]], y.iloc[:400])) for i in (7, 8)]


def test_registry_applies_the_production_versions_policy(
    registry: Registry, fitted: Fitted, one_feature_models: list[bytes]
) -> None:
    """The issue's case on the real registry: production's spec says 3,600 s; a candidate trained
    with ``cooldown_s=0`` (and no margin) cannot move it ten minutes later, however good it is."""
    lax = {**SPEC, "promotion": {"min_improvement": 0.0, "cooldown_s": 0}}
    strict = {**SPEC, "promotion": {"min_improvement": 0.0, "cooldown_s": 3600}}
    demanding = {**SPEC, "promotion": {"min_improvement": 0.5, "cooldown_s": 0}}
    incumbent = register(registry, fitted.weak, fitted, spec=strict)
    candidate = register(registry, fitted.strong, fitted, spec=lax)
    registry.promote("cancer", incumbent.version)  # first promotion: nothing to beat
    evaluate = evaluator(registry)
    with pytest.raises(PromotionRefused, match=r"cooldown is 3600s, 3[56]\d\ds left"):
        registry.promote("cancer", candidate.version, evaluator=evaluate)
    assert registry.resolve("cancer").version == incumbent.version

    # The margin: production's policy asks for more than the candidate beats it by.
    demanding_one = register(registry, one_feature_models[0], fitted, spec=demanding)
    lax_one = register(registry, one_feature_models[1], fitted, spec=lax)
    registry.promote("cancer", demanding_one.version, force=True, reason="test: a demanding incumbent")
    with pytest.raises(PromotionRefused, match=r"required >= 0\.5") as refused:
        registry.promote("cancer", candidate.version, evaluator=evaluate)
    holdout = load_holdout(registry, candidate)
    cand, inc = score(registry, candidate, holdout), score(registry, demanding_one, holdout)
    assert 0 < cand - inc < 0.5  # the candidate is better, by less than production's policy asks
    assert f"{cand:.6g}" in str(refused.value) and f"{inc:.6g}" in str(refused.value)
    assert registry.resolve("cancer").version == demanding_one.version

    # Where neither policy asks more than the candidate does, it passes; the event records the scores.
    registry.promote("cancer", lax_one.version, force=True, reason="test: a lax incumbent")
    registry.promote("cancer", candidate.version, evaluator=evaluate)
    move = registry.state.alias_history("cancer", "production")[-1]
    assert move.version == candidate.version and not move.forced
    gate = move.metadata["gate"]
    assert gate["cooldown_s"] == 0 and gate["min_improvement"] == 0
    inc = score(registry, lax_one, holdout)
    assert gate["scores"] == {"roc_auc": [pytest.approx(cand), pytest.approx(inc)]}
