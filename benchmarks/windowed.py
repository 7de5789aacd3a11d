"""The 50-feature windowed feature set the read-time and training-set benchmarks share.

Ten aggregations (counts, sums, means, min, max, a ratio, a distinct count and, optionally, the
last item instead of one of the sums) over five windows: 5m, 1h, 6h, 24h and 7d.
"""

from __future__ import annotations

from features.definitions import ApproxDistinct, Count, FeatureSet, Last, Max, Mean, Min, Ratio, Sum
from features.predicates import Eq

WINDOWS = ["5m", "1h", "6h", "24h", "7d"]
CLICK = Eq("action", "CLICK")


def windowed_features(name: str, *, with_last: bool = False) -> FeatureSet:
    """``with_last``: the last item seen (a string) in place of the propensity sum; without it,
    every feature is a number (what Feast's float columns can hold)."""
    tenth = (
        Last("item_id", windows=WINDOWS, name="last_item")
        if with_last
        else Sum("propensity", windows=WINDOWS, name="propensity_sum")
    )
    return FeatureSet(
        name,
        entity="user_id",
        source="clicks",
        owner="bench",
        description="Ten aggregations over five windows: 50 features.",
        features=[
            Count(windows=WINDOWS, name="events"),
            Count(windows=WINDOWS, where=CLICK, name="clicks"),
            Sum("position", windows=WINDOWS, name="position_sum"),
            Mean("propensity", windows=WINDOWS, name="mean_propensity"),
            Min("position", windows=WINDOWS, name="min_position"),
            Max("position", windows=WINDOWS, name="max_position"),
            Ratio(Count(where=CLICK), Count(), windows=WINDOWS, name="ctr"),
            ApproxDistinct("item_id", windows=WINDOWS, name="items"),
            Mean("position", windows=WINDOWS, name="mean_position"),
            tenth,
        ],
    )
