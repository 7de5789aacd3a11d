"""The data-quality rules behind the asset checks, on small frames: what passes, what fails, what it says."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from batch.assets import quality
from batch.assets.common import Window, day_bounds

DAY = "2019-11-27"


def test_an_empty_day_fails_with_what_to_check() -> None:
    finding = quality.event_rows(DAY, 0, 1)
    assert not finding.passed
    assert finding.message.startswith(
        "partition 2019-11-27 has 0 click events in the lake (at least 1 expected): is the lake sink running?"
    )
    assert quality.event_rows(DAY, 5, 1).passed


def test_events_without_user_item_or_action_are_counted_against_the_limit() -> None:
    table = pa.table(
        {"user_id": ["u1", "", None, "u4"], "item_id": ["1", "2", "3", "4"], "action": ["CLICK"] * 4}
    )
    finding = quality.event_missing_values(DAY, table, 0.25)
    assert not finding.passed
    assert "50.0% of 4 click events have no user_id (limit 25.0%)" in finding.message
    assert finding.metadata[f"{DAY} missing user_id"] == 0.5
    assert quality.event_missing_values(DAY, table, 0.5).passed
    assert "no column action" in quality.event_missing_values(DAY, table.drop(["action"]), 1).message


def test_freshness_is_the_newest_event_against_the_day_end() -> None:
    _, end = day_bounds(DAY)
    assert quality.event_freshness(DAY, end - 60_000, end, 3600).passed
    stale = quality.event_freshness(DAY, end - 7 * 3_600_000, end, 6 * 3600)
    assert not stale.passed and "7.0 h before the end of the day (limit 6.0 h)" in stale.message
    assert not quality.event_freshness(DAY, None, end, 3600).passed


def test_missing_features_are_judged_per_day_and_name_the_day_to_recompute() -> None:
    frame = pd.DataFrame(
        {
            "day": ["2019-11-26"] * 4 + ["2019-11-27"] * 4,
            "user_activity:clicks_1h": [1, 2, None, 3, None, None, None, 1],
            "item_activity:ctr_24h": [0.1] * 8,
        }
    )
    finding = quality.feature_missing_values(
        "the training set", frame, ["user_activity:clicks_1h"], "day", 0.5
    )
    assert not finding.passed
    assert "on 2019-11-27, 1 of 1 features are missing in more than 50% of its 4 rows" in finding.message
    assert "user_activity:clicks_1h (75%)" in finding.message
    assert "--select feature_values --partition 2019-11-27" in finding.message
    assert "2019-11-26" not in finding.message
    assert finding.metadata["missing user_activity:clicks_1h"] == 0.75
    assert quality.feature_missing_values("t", frame, ["item_activity:ctr_24h"], "day", 0.5).passed


def test_label_balance_needs_positives_within_bounds() -> None:
    bounds = (0.001, 0.5)
    assert quality.label_balance("t", pd.Series([0, 1, 0, 1, 0]), min_positives=2, bounds=bounds).passed
    none = quality.label_balance("t", pd.Series([0] * 100), min_positives=1, bounds=bounds)
    assert not none.passed and "0 positive labels in 100 rows" in none.message
    many = quality.label_balance("t", pd.Series([1] * 9 + [0]), min_positives=1, bounds=bounds)
    assert not many.passed and "90.000% of 10 rows, outside" in many.message
    assert not quality.label_balance("t", pd.Series([1, None]), min_positives=1, bounds=bounds).passed


def test_combined_findings_fail_when_any_day_fails_and_show_the_failures() -> None:
    ok, bad = quality.event_rows("2019-11-26", 3, 1), quality.event_rows(DAY, 0, 1)
    both = quality.combine([ok, bad])
    assert not both.passed and both.message == bad.message
    assert both.metadata == {"2019-11-26 rows": 3, f"{DAY} rows": 0}


def test_windows_name_their_files_and_extend_back_for_training() -> None:
    one = Window((DAY,))
    assert one.key == DAY and (one.start_ms, one.end_ms) == day_bounds(DAY)
    span = Window(("2019-11-26", DAY)).with_lookback(2)
    assert span.days == ("2019-11-24", "2019-11-25", "2019-11-26", DAY)
    assert span.key == "2019-11-24..2019-11-27"
