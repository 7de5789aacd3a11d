"""Model specs for the clickstream sample (ZOZOTOWN Open Bandit Dataset, see features.examples.clickstream).

The data: ~30,000 impressions and 130 clicks over 7 days, a CTR of 0.43 %. With so few
positives the specs keep models small and strongly regularised, and score with ROC AUC
(threshold-free and defined as soon as a holdout has one click; average precision is too
noisy at a handful of positives per day).

- ``ctr_model``: gradient-boosted trees on the user's and the item's recent activity, the
  slot-adjusted CTR and the slot itself; ranks candidate items per user (top 10).
- ``ctr_linear``: logistic regression on a handful of CTR features, its regularisation tuned
  by optuna; the cheap baseline the trees must beat.
"""

from __future__ import annotations

from models.spec import ModelSpec, PostSpec, PromotionPolicy, SearchSpec

__all__ = ["CTR_FEATURES", "specs"]

_USER = [
    "impressions_5m", "impressions_1h", "impressions_24h", "impressions_7d",
    "clicks_5m", "clicks_1h", "clicks_24h", "clicks_7d", "ctr_24h", "ctr_7d",
    "mean_position_24h", "mean_propensity_24h", "best_clicked_position_7d", "distinct_items_24h",
]  # fmt: skip
_ITEM = [
    "impressions_1h", "impressions_24h", "impressions_7d", "clicks_1h", "clicks_24h", "clicks_7d",
    "ctr_1h", "ctr_24h", "ctr_7d", "distinct_users_24h", "mean_position_24h",
]  # fmt: skip

# 27 features: last_clicked_item (a string) and last_click_time (an absolute time, which
# would let a model learn the calendar) are left out.
CTR_FEATURES: tuple[str, ...] = (
    *(f"user_activity:{f}" for f in _USER),
    *(f"item_activity:{f}" for f in _ITEM),
    "item_ctr:ctr_smoothed",
    "item_ctr:ctr_at_position",
)

_OWNER = "recommendations@headwater.dev"


def specs() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="ctr_model",
            entity_keys=("user_id", "item_id"),
            features=CTR_FEATURES,
            request_features=("position",),
            label="clicked",
            task="classification",
            estimator="hist_gradient_boosting",
            # Shallow trees with large leaves: ~100 clicks in a week cannot support more.
            params={
                "max_iter": 100,
                "learning_rate": 0.05,
                "max_depth": 3,
                "max_leaf_nodes": 8,
                "min_samples_leaf": 200,
                "l2_regularization": 1.0,
            },
            metric="roc_auc",
            # best_clicked_position: "never clicked" is not position 0 (which would look better than 1).
            defaults={"user_activity:best_clicked_position_7d": 4, "position": 2},
            post=PostSpec(kind="rank", rank_key="item_id", top_k=10),
            promotion=PromotionPolicy(metric="roc_auc", min_improvement=0.005, cooldown_s=3_600),
            owner=_OWNER,
            contact="#recs-oncall",
            description="P(click) of an item shown to a user in a slot; ranks candidate items per user.",
            consumers=("homepage-recommendations",),
            seed=7,
        ),
        ModelSpec(
            name="ctr_linear",
            entity_keys=("user_id", "item_id"),
            features=(
                "user_activity:ctr_7d",
                "user_activity:clicks_7d",
                "user_activity:impressions_24h",
                "item_activity:ctr_7d",
                "item_activity:impressions_24h",
                "item_ctr:ctr_at_position",
            ),
            request_features=("position",),
            label="clicked",
            task="classification",
            estimator="logistic_regression",
            params={"class_weight": "balanced"},
            search=SearchSpec(
                method="optuna", space={"C": {"low": 1e-3, "high": 10.0, "log": True}}, n_trials=5
            ),
            metric="roc_auc",
            defaults={"position": 2},
            post=PostSpec(kind="score"),
            promotion=PromotionPolicy(metric="roc_auc", min_improvement=0.005, cooldown_s=3_600),
            owner=_OWNER,
            contact="#recs-oncall",
            description="Baseline click model: logistic regression on CTR features, C tuned by optuna.",
            seed=7,
        ),
    ]
