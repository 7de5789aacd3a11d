"""The clickstream feature repository: user and item activity from the ``clicks`` topic.

Built for the sample clickstream (ZOZOTOWN's Open Bandit Dataset, replayed by
:mod:`headwater.sample_data`): every logged recommendation is an ``IMPRESSION`` event,
followed at the same millisecond by a ``CLICK`` event when the user clicked.

- ``user_activity`` (entity ``user_id``): how much a user browsed and clicked in the last
  5 minutes (the current session), hour, day and week; their click-through rate; which
  positions and items they engage with.
- ``item_activity`` (entity ``item_id``): an item's impressions, clicks and CTR over the
  last hour, day and week, how many different users saw it, and where it was shown.
- ``item_ctr`` (on demand): the item's day CTR smoothed towards the site-wide CTR, and
  that CTR adjusted to the slot the item is about to be shown in, a request-time value.

Window semantics (tiles, boundaries, lateness) are in :mod:`features.windows`.
"""

from __future__ import annotations

from features.definitions import ApproxDistinct, Count, FeatureSet, Last, Max, Mean, Min, Ratio
from features.on_demand import on_demand
from features.predicates import Eq
from features.repository import FeatureRepository

__all__ = ["CTR_PRIOR", "POSITION_FACTOR", "item_activity", "item_ctr", "repository", "user_activity"]

IMPRESSION = Eq("action", "IMPRESSION")
CLICK = Eq("action", "CLICK")

user_activity = FeatureSet(
    "user_activity",
    entity="user_id",
    source="clicks",
    owner="recommendations@headwater.dev",
    description=(
        "Recent browsing of each user: impressions and clicks over 5 minutes (the session), "
        "an hour, a day and a week, their CTR, the mean position they are shown, the best "
        "position they clicked, the last item they clicked and how many different items they saw."
    ),
    features=[
        Count(windows=["5m", "1h", "24h", "7d"], where=IMPRESSION, name="impressions"),
        Count(windows=["5m", "1h", "24h", "7d"], where=CLICK, name="clicks"),
        Ratio(Count(where=CLICK), Count(where=IMPRESSION), windows=["24h", "7d"], name="ctr"),
        Mean("position", windows=["24h"], where=IMPRESSION, name="mean_position"),
        Mean("propensity", windows=["24h"], where=IMPRESSION, name="mean_propensity"),
        Min("position", windows=["7d"], where=CLICK, name="best_clicked_position"),
        Last("item_id", windows=["7d"], where=CLICK, name="last_clicked_item"),
        ApproxDistinct("item_id", windows=["24h"], where=IMPRESSION, name="distinct_items"),
    ],
    ttl="7d",
    lateness="1m",
)

item_activity = FeatureSet(
    "item_activity",
    entity="item_id",
    source="clicks",
    owner="recommendations@headwater.dev",
    description=(
        "Popularity of each item: impressions, clicks and CTR over an hour, a day and a week, "
        "distinct users who saw it in the last day, its mean position and its latest click."
    ),
    features=[
        Count(windows=["1h", "24h", "7d"], where=IMPRESSION, name="impressions"),
        Count(windows=["1h", "24h", "7d"], where=CLICK, name="clicks"),
        Ratio(Count(where=CLICK), Count(where=IMPRESSION), windows=["1h", "24h", "7d"], name="ctr"),
        ApproxDistinct("user_id", windows=["24h"], where=IMPRESSION, name="distinct_users"),
        Mean("position", windows=["24h"], where=IMPRESSION, name="mean_position"),
        Max("event_time", windows=["7d"], where=CLICK, name="last_click_time"),
    ],
    ttl="7d",
    lateness="1m",
)

# Site-wide CTR of the sample logs (130 clicks in 30,000 impressions, all three campaigns),
# used as a Beta prior worth 1,000 impressions: a new item starts at the site CTR and its
# own clicks take over as it collects impressions.
CTR_PRIOR = (130 / 30_000, 1_000)

# CTR at each position relative to the overall CTR, from the same uniform-random logs (a
# random policy shows every item at every position, so these carry no selection bias).
# At this sample size the differences are within noise; re-estimate them on your logs.
POSITION_FACTOR = {
    1: (38 / 9_935) / (130 / 30_000),
    2: (51 / 10_174) / (130 / 30_000),
    3: (41 / 9_891) / (130 / 30_000),
}


@on_demand(
    inputs=["item_activity:clicks_24h", "item_activity:impressions_24h", "position"],
    outputs={"ctr_smoothed": float, "ctr_at_position": float},
)
def item_ctr(clicks_24h: int | None, impressions_24h: int | None, position: int) -> dict[str, float]:
    """The item's last-day CTR smoothed towards the site CTR, and adjusted to the requested slot."""
    prior_ctr, strength = CTR_PRIOR
    clicks, impressions = clicks_24h or 0, impressions_24h or 0
    smoothed = (clicks + prior_ctr * strength) / (impressions + strength)
    return {"ctr_smoothed": smoothed, "ctr_at_position": smoothed * POSITION_FACTOR.get(position, 1.0)}


def repository() -> FeatureRepository:
    """The clickstream repository: both feature sets and the on-demand CTR."""
    return FeatureRepository([user_activity, item_activity], on_demand=[item_ctr])
