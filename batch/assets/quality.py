"""Data-quality rules of the asset checks, as pure functions of the data: ``-> Finding``.

Each rule says what is wrong in words a person on call can act on: which day, how much,
the limit, and where to look. The Dagster checks (:mod:`batch.assets.events`,
:mod:`batch.assets.training`) run them per day of the run's window and combine the findings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "REQUIRED_CLICK_COLUMNS",
    "Finding",
    "combine",
    "event_freshness",
    "event_missing_values",
    "event_rows",
    "feature_missing_values",
    "label_balance",
    "training_rows",
]

# A click event the platform can use names its user, its item and what happened.
REQUIRED_CLICK_COLUMNS = ("user_id", "item_id", "action")

Metadata = dict[str, float | int | str]


@dataclass(frozen=True)
class Finding:
    passed: bool
    message: str
    metadata: Metadata = field(default_factory=dict)


def combine(findings: Iterable[Finding]) -> Finding:
    """All findings of a window: passes when each does; the message lists the failures first."""
    items = list(findings)
    failed = [f for f in items if not f.passed]
    shown = failed or items
    metadata: Metadata = {}
    for f in items:
        metadata.update(f.metadata)
    return Finding(not failed, "\n".join(f.message for f in shown), metadata)


def event_rows(day: str, rows: int, min_rows: int) -> Finding:
    if rows < min_rows:
        return Finding(
            False,
            f"partition {day} has {rows} click events in the lake (at least {min_rows} expected): "
            "is the lake sink running? (headwater status; headwater process lake-sink --until-caught-up)",
            {f"{day} rows": rows},
        )
    return Finding(True, f"partition {day}: {rows} click events", {f"{day} rows": rows})


def event_missing_values(day: str, table: pa.Table, max_share: float) -> Finding:
    """Share of events without a user, an item or an action (null or empty)."""
    if table.num_rows == 0:
        return Finding(False, f"partition {day} has no click events to check for missing values")
    absent = [c for c in REQUIRED_CLICK_COLUMNS if c not in table.column_names]
    if absent:
        return Finding(False, f"partition {day}: click events have no column {', '.join(absent)}")
    shares: dict[str, float] = {}
    for column in REQUIRED_CLICK_COLUMNS:
        values = table.column(column)
        missing = pc.sum(pc.or_kleene(pc.is_null(values), pc.equal(pc.cast(values, pa.string()), "")))
        shares[column] = (missing.as_py() or 0) / table.num_rows
    worst = max(shares, key=lambda c: shares[c])
    metadata: Metadata = {f"{day} missing {c}": round(s, 6) for c, s in shares.items()}
    if shares[worst] > max_share:
        return Finding(
            False,
            f"partition {day}: {shares[worst]:.1%} of {table.num_rows} click events have no {worst} "
            f"(limit {max_share:.1%}): the producer sends malformed events",
            metadata,
        )
    return Finding(True, f"partition {day}: missing values within {max_share:.1%}", metadata)


def event_freshness(day: str, newest_ms: int | None, day_end_ms: int, max_lag_s: float) -> Finding:
    """The newest event of the day should be close to the day's end: otherwise the lake stopped filling."""
    if newest_ms is None:
        return Finding(False, f"partition {day} has no click events, so no freshness")
    lag_s = max(0.0, (day_end_ms - newest_ms) / 1000)
    metadata: Metadata = {f"{day} lag_s": round(lag_s, 3)}
    if lag_s > max_lag_s:
        return Finding(
            False,
            f"partition {day}: the newest click event is {lag_s / 3600:.1f} h before the end of the day "
            f"(limit {max_lag_s / 3600:.1f} h): the lake stopped receiving events; is the lake sink "
            "behind or was the day materialized before it ended?",
            metadata,
        )
    return Finding(True, f"partition {day}: newest event {lag_s:.0f} s before day end", metadata)


def training_rows(what: str, rows: int, min_rows: int) -> Finding:
    if rows < min_rows:
        return Finding(
            False,
            f"{what} has {rows} labelled rows (at least {min_rows} expected): no impressions in the "
            "training window; check the raw_clicks asset of those days",
            {"rows": rows},
        )
    return Finding(True, f"{what}: {rows} labelled rows", {"rows": rows})


def feature_missing_values(
    what: str, frame: pd.DataFrame, features: Sequence[str], day_column: str, max_share: float
) -> Finding:
    """Per day of the training window and per feature, the share of rows without a value."""
    if frame.empty:
        return Finding(False, f"{what} has no rows to check for missing features")
    findings = []
    worst: Metadata = {}
    for day, rows in frame.groupby(day_column, sort=True):
        shares = rows[list(features)].isna().mean() if features else pd.Series(dtype=float)
        for feature, share in shares.items():
            worst[str(feature)] = max(float(worst.get(str(feature), 0.0)), round(float(share), 6))
        bad = shares[shares > max_share]
        if len(bad):
            ordered = bad.sort_values(ascending=False, kind="stable")
            listed = ", ".join(f"{f} ({s:.0%})" for f, s in ordered.head(5).items())
            if len(bad) > 5:
                listed += f" and {len(bad) - 5} more"
            findings.append(
                Finding(
                    False,
                    f"{what}: on {day}, {len(bad)} of {len(features)} features are missing in more than "
                    f"{max_share:.0%} of its {len(rows)} rows: {listed}. Are the feature values of {day} "
                    f"computed? (dagster asset materialize --select feature_values --partition {day})",
                )
            )
    metadata: Metadata = {f"missing {f}": s for f, s in worst.items()}
    if findings:
        return Finding(False, "\n".join(f.message for f in findings), metadata)
    return Finding(True, f"{what}: every feature present in at least {1 - max_share:.0%} of rows", metadata)


def label_balance(
    what: str, labels: pd.Series, *, min_positives: int, bounds: tuple[float, float]
) -> Finding:
    """Positives present, and their share within bounds (0/1 or boolean labels)."""
    values = pd.to_numeric(labels, errors="coerce")
    if values.isna().any():
        return Finding(False, f"{what}: {int(values.isna().sum())} rows have no label")
    n = len(values)
    positives = int(np.count_nonzero(values.to_numpy() > 0))
    share = positives / n if n else 0.0
    metadata: Metadata = {"positives": positives, "positive_share": round(share, 6)}
    low, high = bounds
    if positives < min_positives:
        return Finding(
            False,
            f"{what}: {positives} positive labels in {n} rows (at least {min_positives} needed to train "
            "and evaluate): are CLICK events reaching the lake?",
            metadata,
        )
    if not low <= share <= high:
        return Finding(
            False,
            f"{what}: positive labels are {share:.3%} of {n} rows, outside [{low:.3%}, {high:.3%}]: "
            "the labels or the click logging changed",
            metadata,
        )
    return Finding(True, f"{what}: {positives} positives ({share:.3%})", metadata)
