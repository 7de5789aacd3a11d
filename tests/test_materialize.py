"""``materialize``: each entity's latest offline update in a range, into the online store.

Hand-written feature updates in a real lake (the sink's ``LakeWriter``), read back through the
embedded offline store, written to a real LMDB. What is checked: the latest update per entity
is the one with the greatest event time, then write time, then lake position (partition,
offset); only the feature set's current version and the range ``[start, end)`` count; nulls
and missing values read back as None; counts read back as integers, as the stream writes them
(the lake holds doubles); the TTL runs from the event time; values the online store holds
that are newer are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batch.materialize import materialize
from features import Count, FeatureRepository, FeatureSet, Last
from headwater.errors import NotFoundError
from headwater.settings import Settings, load_settings
from processors.lake import LakeWriter
from serving.online_store import open_online_store
from streams.catalog import SchemaCatalog

T0 = 1_700_000_000_000
HOUR = 3_600_000
FS = FeatureSet(
    "mat",
    entity="user_id",
    source="clicks",
    owner="tests",
    description="Two features for the materialize tests.",
    features=[Count(windows=["1h"], name="n"), Last("item_id", windows=["1h"], name="item")],
    version=2,
)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data")


def update(
    entity: str,
    event_time: int,
    write_time: int,
    values: dict[str, Any],
    *,
    fs: str = "mat",
    version: int = 2,
) -> dict[str, Any]:
    return {
        "event_id": f"{fs}|{entity}|{event_time}|{write_time}|{sorted(values.items())}",
        "feature_set": fs,
        "feature_set_version": version,
        "entity_key": entity,
        "event_time": event_time,
        "write_time": write_time,
        "values": values,
        "source": "STREAM",
    }


def archive(settings: Settings, rows: list[tuple[int, int, dict[str, Any]]]) -> None:
    LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir)).write("feature-updates", rows)


def online(settings: Settings, keys: list[str], now_ms: int) -> dict[str, tuple[int | None, dict[str, Any]]]:
    with open_online_store(settings) as store:
        rows = store.get_batch("mat", keys, ["n_1h", "item_1h"], now_ms=now_ms)
    return {k: (r.event_time_ms, r.values) for k, r in zip(keys, rows, strict=True)}


def test_the_latest_update_wins_by_event_time_then_write_time_then_lake_position(settings: Settings) -> None:
    end = T0 + 100
    archive(
        settings,
        [
            (0, 0, update("by-event-time", T0 + 20, T0 + 20, {"n_1h": 2, "item_1h": "new"})),
            (0, 1, update("by-event-time", T0 + 10, T0 + 90, {"n_1h": 1, "item_1h": "old"})),
            (0, 2, update("by-write-time", T0 + 20, T0 + 30, {"n_1h": 3, "item_1h": "written last"})),
            (0, 3, update("by-write-time", T0 + 20, T0 + 25, {"n_1h": 4, "item_1h": "written first"})),
            (1, 0, update("by-partition", T0 + 20, T0 + 20, {"n_1h": 5, "item_1h": "partition 1"})),
            (0, 9, update("by-partition", T0 + 20, T0 + 20, {"n_1h": 6, "item_1h": "partition 0"})),
            (0, 14, update("signed", T0 + 20, -5, {"n_1h": 15, "item_1h": "negative write time"})),
            (0, 15, update("signed", T0 + 20, 3, {"n_1h": 16, "item_1h": "positive write time"})),
            (0, 4, update("by-offset", T0 + 20, T0 + 20, {"n_1h": 7, "item_1h": "offset 4"})),
            (0, 5, update("by-offset", T0 + 20, T0 + 20, {"n_1h": 8, "item_1h": "offset 5"})),
            (0, 6, update("in-range", T0 + 99, T0 + 99, {"n_1h": 9, "item_1h": "before the end"})),
            (0, 7, update("in-range", end, end, {"n_1h": 10, "item_1h": "at the end: excluded"})),
            (0, 8, update("in-range", T0 - 1, T0 + 200, {"n_1h": 11, "item_1h": "before the start"})),
            (0, 10, update("other-version", T0 + 20, T0 + 20, {"n_1h": 12, "item_1h": "v1"}, version=1)),
            (0, 11, update("by-event-time", T0 + 50, T0 + 50, {"n_1h": 13}, version=1)),
            (0, 12, update("other-set", T0 + 20, T0 + 20, {"n_1h": 14}, fs="other")),
            (0, 13, update("nulls", T0 + 20, T0 + 20, {"n_1h": None})),
        ],
    )
    result = materialize(settings, FeatureRepository([FS]), "mat", T0, end)
    assert (result.entities, result.written) == (7, 7)
    got = online(
        settings, ["by-event-time", "by-write-time", "by-partition", "by-offset", "in-range", "signed"], T0
    )
    assert {k: v[1]["item_1h"] for k, v in got.items()} == {
        "by-event-time": "new",
        "by-write-time": "written last",
        "by-partition": "partition 1",
        "by-offset": "offset 5",
        "in-range": "before the end",
        "signed": "positive write time",
    }
    assert got["in-range"][0] == T0 + 99 and got["by-event-time"] == (
        T0 + 20,
        {"n_1h": 2, "item_1h": "new"},
    )
    assert type(got["by-event-time"][1]["n_1h"]) is int  # a count, as the stream writes it
    assert online(settings, ["nulls", "other-version", "other-set"], T0) == {
        "nulls": (T0 + 20, {"n_1h": None, "item_1h": None}),
        "other-version": (None, {"n_1h": None, "item_1h": None}),
        "other-set": (None, {"n_1h": None, "item_1h": None}),
    }


def test_ttl_from_the_event_time_and_newer_online_values_kept(settings: Settings) -> None:
    archive(
        settings,
        [(0, i, update(f"u{i}", T0 + i, T0 + i, {"n_1h": i, "item_1h": f"i{i}"})) for i in range(50)],
    )
    with open_online_store(settings) as store:  # the stream already wrote newer values of two
        store.put_batch("mat", [("u7", T0 + 1000, {"n_1h": -1}), ("u8", T0 + 8, {"n_1h": -2})])
    result = materialize(settings, FeatureRepository([FS]), "mat", T0, T0 + HOUR)
    assert (result.entities, result.written) == (50, 49)  # u8's tie: the materialized value wins
    got = online(settings, [f"u{i}" for i in range(50)], T0 + 10)
    assert got.pop("u7") == (T0 + 1000, {"n_1h": -1, "item_1h": None})
    assert got == {f"u{i}": (T0 + i, {"n_1h": i, "item_1h": f"i{i}"}) for i in range(50) if i != 7}
    # FS's TTL is its longest window (1h), from each value's event time.
    assert online(settings, ["u3"], T0 + 3 + HOUR - 1)["u3"][0] == T0 + 3
    assert online(settings, ["u3"], T0 + 3 + HOUR)["u3"][0] is None


def test_an_empty_range_writes_nothing_and_unknown_features_are_reported(settings: Settings) -> None:
    archive(settings, [(0, 0, update("u", T0, T0, {"n_1h": 1, "item_1h": "x"}))])
    result = materialize(settings, FeatureRepository([FS]), "mat", T0 + 1, T0 + 2)
    assert (result.entities, result.written) == (0, 0)
    assert online(settings, ["u"], T0)["u"][0] is None
    wider = FeatureSet(
        "mat",
        entity="user_id",
        source="clicks",
        owner="tests",
        description="A feature the lake has no values of.",
        features=[Count(windows=["1h", "2h"], name="n")],
        version=2,
    )
    with pytest.raises(NotFoundError, match="mat:n_2h"):
        materialize(settings, FeatureRepository([wider]), "mat", T0, T0 + 1)


def test_a_long_feature_with_a_fraction_in_the_lake_is_written_as_read(settings: Settings) -> None:
    archive(
        settings,
        [
            (0, 0, update("whole", T0, T0, {"n_1h": 3, "item_1h": "x"})),
            (0, 1, update("odd", T0, T0, {"n_1h": 2.5, "item_1h": "y"})),
        ],
    )
    materialize(settings, FeatureRepository([FS]), "mat", T0, T0 + 1)
    got = online(settings, ["whole", "odd"], T0)
    assert [got[k][1]["n_1h"] for k in ("whole", "odd")] == [3.0, 2.5]  # not truncated to 2
