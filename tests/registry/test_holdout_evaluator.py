"""The promotion gate with the real Model Pipeline: `holdout_evaluator` on the real clickstream sample
(models trained in :mod:`tests.registry.real_models`)."""

from __future__ import annotations

import pytest

from headwater.settings import Settings
from registry import PromotionRefused, Registry, holdout_evaluator
from streams.serde import Serde
from tests.registry.real_models import NAME, RealModels, register_real


def test_gate_with_the_real_pipeline(
    settings: Settings,
    serde: Serde,
    trained: RealModels,
) -> None:
    repository, models = trained
    weak_auc, strong_auc = models["weak"][1].metrics["roc_auc"], models["strong"][1].metrics["roc_auc"]
    assert strong_auc > weak_auc + 0.005, (weak_auc, strong_auc)
    with Registry(settings, serde, actor="test") as registry:
        evaluate = holdout_evaluator(registry, repository)
        weak = register_real(registry, *models["weak"])
        registry.promote(NAME, weak.version, evaluator=evaluate)
        strong = register_real(registry, *models["strong"])
        registry.promote(NAME, strong.version, evaluator=evaluate)
        gate = registry.state.alias_history(NAME, "production")[-1].metadata["gate"]
        assert gate["candidate_score"] == pytest.approx(strong_auc)
        assert gate["incumbent_score"] == pytest.approx(weak_auc)  # same split: the same holdout rows
        # The weak one back over the strong one: refused, with both scores.
        with pytest.raises(
            PromotionRefused, match=f"candidate roc_auc {weak_auc:.6g} vs incumbent {strong_auc:.6g}"
        ):
            registry.promote(NAME, weak.version, evaluator=evaluate)
        assert registry.resolve(NAME).version == strong.version
