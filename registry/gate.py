"""The promotion gate (pure): deploys cost something.

A candidate moves an alias only if it beats the version the alias points at on the SAME
holdout (the candidate's) by the policy's ``min_improvement`` on the policy's metric, in the
metric's direction, and the alias has not moved within the policy's cooldown. The first
promotion of an alias (no incumbent) passes the metric check. ``force`` skips both checks
but needs a reason, which the registry records in the event.

Two policies apply, not one: the candidate's and the incumbent's (each version's spec carries
its own). The incumbent's protects what is serving, so a candidate trained with a laxer
policy (``cooldown_s=0``, no margin) cannot move an alias its incumbent's policy still holds.
Where they differ the stricter wins (:func:`promotion_policies`): the longer cooldown, the
larger margin on a shared metric, and when they name different metrics the candidate must
beat the incumbent on each.

The policy is the model spec's ``promotion`` (``models.spec.PromotionPolicy``: ``metric``,
``min_improvement``, ``cooldown_s``); any object with those attributes will do, so this
module does not import the models package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    "promotion_policies",
]

#: (candidate, incumbent, metric) -> their scores by ``metric`` on the candidate's holdout, in that order.
Evaluator = Callable[[Any, Any, str], tuple[float, float]]

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
    """The verdict; the scores are those of the first policy's metric (the candidate's)."""

    allowed: bool
    message: str
    candidate_score: float | None = None
    incumbent_score: float | None = None
    #: metric -> (candidate, incumbent), for every metric compared
    scores: Mapping[str, tuple[float, float]] = field(default_factory=dict)


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


def promotion_policies(
    candidate_spec: Mapping[str, Any] | None,
    incumbent_spec: Mapping[str, Any] | None = None,
    override: PromotionPolicyLike | None = None,
    *,
    has_incumbent: bool | None = None,
) -> tuple[Policy, ...]:
    """What a promotion must pass: the candidate's policy (``override`` replaces it) and, when the
    alias has an incumbent, the incumbent spec's policy, merged stricter-wins.

    One :class:`Policy` per metric to compare, the candidate's metric first, each with the largest
    margin any of the two policies asks on it and all with the longer cooldown. An incumbent
    whose spec names no metric (registered without a spec) still brings its cooldown.
    ``has_incumbent`` defaults to whether ``incumbent_spec`` is given.
    """
    if has_incumbent is None:
        has_incumbent = incumbent_spec is not None
    policies = [policy_from_spec(candidate_spec, override, require_metric=has_incumbent)]
    if has_incumbent:
        policies.append(policy_from_spec(incumbent_spec, require_metric=False))
    return strictest(policies)


def strictest(policies: Sequence[Policy]) -> tuple[Policy, ...]:
    """The stricter of ``policies`` where they differ: one policy per named metric (first-seen
    order) with its largest margin, every one with the longest cooldown."""
    cooldown = max((p.cooldown_s for p in policies), default=0.0)
    by_metric: dict[str, Policy] = {}
    for p in policies:
        if not p.metric:
            continue  # no metric to compare on (a first promotion, or a version without a spec)
        seen = by_metric.get(p.metric)
        if seen is None or p.min_improvement > seen.min_improvement:
            by_metric[p.metric] = p
    merged = tuple(replace(p, cooldown_s=cooldown) for p in by_metric.values())
    return merged or (Policy("", cooldown_s=cooldown),)


def _cooldown(cooldown_s: float, last_move_ms: int | None, now_ms: int) -> float:
    """Seconds of cooldown left (0 when none)."""
    if last_move_ms is None or cooldown_s <= 0:
        return 0.0
    return max(0.0, cooldown_s - (now_ms - last_move_ms) / 1000)


def _compare(policy: Policy, candidate: float, incumbent: float) -> tuple[bool, str]:
    name = policy.metric
    if math.isnan(candidate) or math.isnan(incumbent):
        return False, f"{name} is NaN (candidate {candidate}, incumbent {incumbent})"
    gain = candidate - incumbent if policy.higher_is_better else incumbent - candidate
    direction = "higher" if policy.higher_is_better else "lower"
    summary = (
        f"candidate {name} {candidate:.6g} vs incumbent {incumbent:.6g} on the candidate's holdout "
        f"({direction} is better; improvement {gain:+.6g}, required >= {policy.min_improvement:g})"
    )
    return gain > 0 and gain >= policy.min_improvement, summary


def check_promotion(
    policy: Policy | Sequence[Policy],
    *,
    target: str,
    last_move_ms: int | None,
    now_ms: int,
    scores: Callable[[str], tuple[float, float]] | None,
) -> GateDecision:
    """Decide a promotion to ``target`` ("name@alias") under one policy or several (every one must
    pass; see :func:`promotion_policies`). ``scores(metric)`` gives (candidate, incumbent) and is
    None when there is no incumbent; it is only called once the cooldown check has passed
    (scoring loads models), once per metric."""
    policies = (policy,) if isinstance(policy, Policy) else tuple(policy)
    cooldown_s = max((p.cooldown_s for p in policies), default=0.0)
    left = _cooldown(cooldown_s, last_move_ms, now_ms)
    if left > 0:
        return GateDecision(
            False,
            f"{target} moved {(now_ms - (last_move_ms or 0)) / 1000:.0f}s ago; cooldown is "
            f"{cooldown_s:.0f}s, {left:.0f}s left (wait, or --force with a --reason)",
        )
    if scores is None:
        return GateDecision(True, f"first promotion to {target}: no incumbent to beat")
    compared = [p for p in policies if p.metric]
    if not compared:
        raise ConfigError(f"promoting over {target} needs a metric: neither version's spec names one")
    results: dict[str, tuple[float, float]] = {}
    summaries, failed = [], []
    for p in compared:
        results[p.metric] = scores(p.metric)
        ok, summary = _compare(p, *results[p.metric])
        summaries.append(summary)
        if not ok:
            failed.append(summary)
    first = results[compared[0].metric]
    if failed:
        return GateDecision(
            False, f"candidate does not beat {target}: {'; '.join(failed)}", *first, scores=results
        )
    return GateDecision(True, "; ".join(summaries), *first, scores=results)
