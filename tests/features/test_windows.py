"""The written window semantics, and the sketch agreeing bit for bit with ClickHouse."""

from __future__ import annotations

import chdb
import pytest

from features.windows import (
    DISTINCT_BUCKETS,
    distinct_bucket,
    distinct_estimate,
    format_duration,
    is_too_late,
    parse_duration,
    tile_ms,
    window_start,
)
from headwater.errors import ConfigError
from headwater.sample_data import iter_events

S, M, H, D = 1000, 60_000, 3_600_000, 86_400_000


@pytest.mark.parametrize(
    ("window", "tile"),
    [
        ("5m", 5 * S),
        ("1h", M),
        ("24h", 10 * M),
        ("7d", H),
        ("30s", S),
        ("90s", S),
        ("30d", H),
        ("1d", 10 * M),
    ],
)
def test_tile_sizes(window: str, tile: int) -> None:
    assert tile_ms(parse_duration(window)) == tile


def test_durations() -> None:
    assert parse_duration("24h") == D and format_duration(D) == "1d" and format_duration(90 * S) == "90s"
    with pytest.raises(ConfigError):
        parse_duration("-5m")


def test_window_start_hops_by_tile_and_includes_its_boundary() -> None:
    w = 5 * M  # 5 s tiles, 60 of them
    base = 1_700_000_000_000  # a tile boundary
    assert window_start(base + w - 1, w) == base  # the last instant whose window still holds `base`
    assert window_start(base + w, w) == base + 5 * S  # one tile later
    for t in range(base, base + 2 * w, 777):
        start = window_start(t, w)
        assert start % (5 * S) == 0
        assert w - 5 * S < t - start + 1 <= w  # spans between W - tile and W, end inclusive


def test_lateness_boundary() -> None:
    assert not is_too_late(100, None, 10)
    assert not is_too_late(90, 100, 10)  # exactly the lateness behind: accepted
    assert is_too_late(89, 100, 10)


def test_distinct_estimate_equals_clickhouse_for_every_bucket_count() -> None:
    m = DISTINCT_BUCKETS
    rows = chdb.query(
        f"SELECT number, toInt64(round(-{m} * log(1 - least(number, {m - 1}) / {m}))) FROM numbers({m + 1})",
        "CSV",
    )
    sql = [int(line.split(",")[1]) for line in str(rows).split()]
    assert sql == [distinct_estimate(b) for b in range(m + 1)]
    assert (
        distinct_estimate(0) == 0
        and distinct_estimate(1) == 1
        and distinct_estimate(m) == distinct_estimate(m - 1)
    )


def test_distinct_buckets_equal_clickhouse_on_real_values() -> None:
    values = sorted(
        {e[f] for topic, e in iter_events("all") if topic == "clicks" for f in ("user_id", "item_id")}
    )
    listed = ", ".join("'" + v + "'" for v in values)
    rows = chdb.query(
        f"SELECT x, xxHash64(x) % {DISTINCT_BUCKETS} FROM (SELECT arrayJoin([{listed}]) AS x)", "CSV"
    )
    sql = {line.split(",")[0].strip('"'): int(line.split(",")[1]) for line in str(rows).split()}
    assert sql == {v: distinct_bucket(v) for v in values}
    assert distinct_bucket(42) == distinct_bucket("42")  # integers hash as their decimal text
