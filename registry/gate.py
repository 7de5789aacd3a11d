"""The promotion gate (pure): deploys cost something.

A candidate moves an alias only if it beats the version the alias points at on the SAME
holdout (the candidate's) by the policy's ``min_improvement`` on the policy's metric, in the
metric's direction, and the alias has not moved within the policy's cooldown. The first
promotion of an alias (no incumbent) passes the metric check. ``force`` skips both checks
but needs a reason, which the registry records in the event.

The policy is the model spec's ``promotion`` (``models.spec.PromotionPolicy``: ``metric``,
``min_improvement``, ``cooldown_s``); any object with those attributes will do, so this
module does not import the models package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from headwater.errors import ConfigError, HeadwaterError

__all__ = [
    "Evaluator",
    "GateDecision",
    "Policy",
    "PromotionPolicyLike",
    "PromotionRefused",
    "check_promotion",
    "higher_is_better",
    "policy_from_spec",
]

#: (candidate, incumbent) -> their scores on the candidate's holdout, in that order.
Evaluator = Callable[[Any, Any], tuple[float, float]]

# Metrics where smaller is better, when models.metrics cannot be asked (names as in sklearn).
_LOWER_IS_BETTER = ("loss", "error", "mse", "rmse", "mae", "brier", "inertia", "deviance")


class PromotionRefused(HeadwaterError):  # noqa: N818 - the contract's name
    """The gate said no; the message says why, with both scores or the cooldown left."""


class PromotionPolicyLike(Protocol):
    @property
    def metric(self) -> str | None: ...
    @property
    def min_improvement(self) -> float: ...
    @property
    def cooldown_s(self) -> float: ...


@dataclass(frozen=True)
class Policy:
    """A resolved promotion policy: the metric is always named here."""

    metric: str
    min_improvement: float = 0.0
    cooldown_s: float = 0.0
    higher_is_better: bool = True


@dataclass(frozen=True)
class GateDecision:
    allowed: bool
    message: str
    candidate_score: float | None = None
    incumbent_score: float | None = None


def higher_is_better(metric: str) -> bool:
    """The metric's direction: models.metrics knows it; else a name rule (losses and errors go down)."""
    try:
        from models.metrics import get_metric  # the MODELS package's metric table

        return get_metric(metric).higher_is_better
    except (ImportError, ConfigError):  # no models package, or a metric it does not know
        pass
    return not any(word in metric.lower() for word in _LOWER_IS_BETTER)


def policy_from_spec(
    spec: Mapping[str, Any] | None,
    override: PromotionPolicyLike | None = None,
    *,
    require_metric: bool = True,
) -> Policy:
    """The policy of a version: ``override`` if given, else its spec's ``promotion`` (metric defaults
    to the spec's metric). Without ``require_metric`` (a first promotion: nothing to compare) a
    missing metric is allowed and left empty."""
    spec = spec or {}
    raw: Mapping[str, Any] = spec.get("promotion") or {}
    if override is not None:
        raw = {
            "metric": override.metric,
            "min_improvement": override.min_improvement,
            "cooldown_s": override.cooldown_s,
        }
    metric = raw.get("metric") or spec.get("metric")
    if not metric and not require_metric:
        metric = ""
    elif not metric:
        raise ConfigError(
            "no promotion metric: the version's spec names none; pass a PromotionPolicy with a metric"
        )
    return Policy(
        metric=str(metric),
        min_improvement=float(raw.get("min_improvement") or 0.0),
        cooldown_s=float(raw.get("cooldown_s") or 0.0),
        higher_is_better=higher_is_better(str(metric)) if metric else True,
    )


def _cooldown(policy: Policy, last_move_ms: int | None, now_ms: int) -> float:
    """Seconds of cooldown left (0 when none)."""
    if last_move_ms is None or policy.cooldown_s <= 0:
        return 0.0
    return max(0.0, policy.cooldown_s - (now_ms - last_move_ms) / 1000)


def check_promotion(
    policy: Policy,
    *,
    target: str,
    last_move_ms: int | None,
    now_ms: int,
    scores: Callable[[], tuple[float, float]] | None,
) -> GateDecision:
    """Decide a promotion to ``target`` ("name@alias"). ``scores`` is None when there is no incumbent;
    it is only called once the cooldown check has passed (scoring loads models)."""
    left = _cooldown(policy, last_move_ms, now_ms)
    if left > 0:
        return GateDecision(
            False,
            f"{target} moved {(now_ms - (last_move_ms or 0)) / 1000:.0f}s ago; cooldown is "
            f"{policy.cooldown_s:.0f}s, {left:.0f}s left (wait, or --force with a --reason)",
        )
    if scores is None:
        return GateDecision(True, f"first promotion to {target}: no incumbent to beat")
    candidate, incumbent = scores()
    name = policy.metric
    if math.isnan(candidate) or math.isnan(incumbent):
        return GateDecision(
            False, f"{name} is NaN (candidate {candidate}, incumbent {incumbent})", candidate, incumbent
        )
    gain = candidate - incumbent if policy.higher_is_better else incumbent - candidate
    direction = "higher" if policy.higher_is_better else "lower"
    summary = (
        f"candidate {name} {candidate:.6g} vs incumbent {incumbent:.6g} on the candidate's holdout "
        f"({direction} is better; improvement {gain:+.6g}, required >= {policy.min_improvement:g})"
    )
    if gain > 0 and gain >= policy.min_improvement:
        return GateDecision(True, summary, candidate, incumbent)
    return GateDecision(False, f"candidate does not beat {target}: {summary}", candidate, incumbent)
