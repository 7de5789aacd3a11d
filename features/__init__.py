"""Feature definitions: declared once, computed by every engine with one meaning.

- :mod:`features.definitions`: feature sets and their windowed aggregations;
- :mod:`features.predicates`: declarative filters (``where=Eq("action", "CLICK")``);
- :mod:`features.windows`: the window semantics, written down once;
- :mod:`features.on_demand`: request-time transforms;
- :mod:`features.repository`: a deployment's feature sets and transforms, and ref lookup;
- :mod:`features.engine`: the streaming engine (pure per-event logic);
- :mod:`features.sql`: the same feature set compiled to ClickHouse SQL (the backfill);
- :mod:`features.examples.clickstream`: the example repository for the sample clickstream.
"""

from features.definitions import (
    ApproxDistinct,
    Count,
    Feature,
    FeatureSet,
    Last,
    Max,
    Mean,
    Min,
    Ratio,
    Sum,
    aggregation,
)
from features.engine import Aggregator, EntityState, EventRejected
from features.on_demand import OnDemandTransform, apply_on_demand, on_demand
from features.predicates import And, Eq, Ge, Gt, In, IsNull, Le, Lt, Ne, Not, NotNull, Or, Predicate
from features.repository import FeatureRef, FeatureRepository
from features.sql import backfill_sql

__all__ = [
    "Aggregator",
    "And",
    "ApproxDistinct",
    "Count",
    "EntityState",
    "Eq",
    "EventRejected",
    "Feature",
    "FeatureRef",
    "FeatureRepository",
    "FeatureSet",
    "Ge",
    "Gt",
    "In",
    "IsNull",
    "Last",
    "Le",
    "Lt",
    "Max",
    "Mean",
    "Min",
    "Ne",
    "Not",
    "NotNull",
    "OnDemandTransform",
    "Or",
    "Predicate",
    "Ratio",
    "Sum",
    "aggregation",
    "apply_on_demand",
    "backfill_sql",
    "on_demand",
]
