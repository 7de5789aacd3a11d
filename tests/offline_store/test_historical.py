"""Point-in-time correctness of get_historical_features, through the embedded (chdb) store."""

from __future__ import annotations

import math
import random
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from batch.offline_store import OfflineStore, get_historical_features
from headwater.errors import ConfigError, NotFoundError
from processors.lake import LakeWriter
from tests.offline_store.conftest import T0, feature_update


def _write(writer: LakeWriter, updates: list[dict[str, Any]]) -> None:
    writer.write("feature-updates", [(0, i, u) for i, u in enumerate(updates)])


def _labels(*rows: tuple[str, int]) -> pd.DataFrame:
    return pd.DataFrame({"entity_key": [e for e, _ in rows], "label_time": [t for _, t in rows]})


def _values(df: pd.DataFrame, column: str) -> list[Any]:
    """The column's values with every kind of missing (NaN of a double, NA of a nullable type) as None."""
    return [None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v for v in df[column]]


def test_late_value_counts_only_once_written(store: OfflineStore, writer: LakeWriter) -> None:
    _write(
        writer,
        [
            feature_update("u", "a", T0 + 100, T0 + 100, {"x": 1}),
            feature_update("u", "a", T0 + 200, T0 + 900, {"x": 2}),  # event before the label, written after
        ],
    )
    labels = _labels(("a", T0 + 500), ("a", T0 + 1000))
    assert _values(get_historical_features(store, labels, ["u:x"]), "u:x") == [1.0, 2.0]
    assert _values(get_historical_features(store, labels, ["u:x"], bitemporal=False), "u:x") == [2.0, 2.0]


def test_value_written_after_the_label_is_never_seen(store: OfflineStore, writer: LakeWriter) -> None:
    _write(writer, [feature_update("u", "a", T0 + 600, T0 + 600, {"x": 7})])
    labels = _labels(("a", T0 + 500))
    for bitemporal in (True, False):
        got = get_historical_features(store, labels, ["u:x"], bitemporal=bitemporal)
        assert _values(got, "u:x") == [None]


def test_equal_times_are_visible_one_millisecond_later_is_not(
    store: OfflineStore, writer: LakeWriter
) -> None:
    _write(
        writer,
        [
            feature_update("u", "a", T0, T0, {"x": 1}),
            feature_update("u", "b", T0, T0 + 1, {"x": 2}),  # written 1 ms after the label
            feature_update("u", "c", T0 + 1, T0 + 1, {"x": 3}),  # happened 1 ms after the label
        ],
    )
    labels = _labels(("a", T0), ("b", T0), ("c", T0), ("b", T0 + 1), ("c", T0 + 1))
    got = get_historical_features(store, labels, ["u:x"])
    assert _values(got, "u:x") == [1.0, None, None, 2.0, 3.0]
    got = get_historical_features(store, labels, ["u:x"], bitemporal=False)
    assert _values(got, "u:x") == [1.0, 2.0, None, 2.0, 3.0]


def test_backfill_written_late_does_not_hide_a_newer_value(store: OfflineStore, writer: LakeWriter) -> None:
    _write(
        writer,
        [
            feature_update("u", "a", T0 + 100, T0 + 110, {"x": 1}),
            feature_update("u", "a", T0 + 300, T0 + 310, {"x": 3}),
            feature_update("u", "a", T0 + 200, T0 + 5000, {"x": 2}),  # a backfill of an older event time
            feature_update("u", "a", T0 + 300, T0 + 6000, {"x": 33}),  # recomputed: same event time, later
        ],
    )
    labels = _labels(("a", T0 + 250), ("a", T0 + 400), ("a", T0 + 5500), ("a", T0 + 7000))
    got = get_historical_features(store, labels, ["u:x"], include_timestamps=True)
    assert _values(got, "u:x") == [1.0, 3.0, 3.0, 33.0]
    assert list(got["u:write_time"]) == [T0 + 110, T0 + 310, T0 + 310, T0 + 6000]
    got = get_historical_features(store, labels, ["u:x"], bitemporal=False)
    assert _values(got, "u:x") == [2.0, 33.0, 33.0, 33.0]


def test_several_feature_sets_entities_and_missing_values(store: OfflineStore, writer: LakeWriter) -> None:
    _write(
        writer,
        [
            feature_update("user", "u1", T0, T0, {"clicks": 5, "segment": "gold"}),
            feature_update("user", "u1", T0 + 50, T0 + 50, {"clicks": 6}),  # segment absent from this update
            feature_update("item", "i1", T0 + 10, T0 + 10, {"ctr": 0.25}),
            feature_update("item", "u1", T0 + 10, T0 + 10, {"ctr": 0.99}),  # same key, other feature set
        ],
    )
    labels = pd.DataFrame(
        {
            "user": ["u1", "u1", "nobody", "u1"],
            "item": ["i1", "i1", "i1", "unknown"],
            "ts": [T0 + 20, T0 + 60, T0 + 60, T0 + 5],
            "label": [1, 0, 1, 0],
        }
    )
    got = get_historical_features(
        store,
        labels,
        ["user:clicks", "user:segment", "item:ctr"],
        entity_columns={"user": "user", "item": "item"},
        time_column="ts",
    )
    assert list(got.columns) == ["user", "item", "ts", "label", "user:clicks", "user:segment", "item:ctr"]
    assert list(got["label"]) == [1, 0, 1, 0]
    assert _values(got, "user:clicks") == [5.0, 6.0, None, 5.0]
    assert _values(got, "user:segment") == ["gold", None, None, "gold"]
    assert _values(got, "item:ctr") == [0.25, 0.25, 0.25, None]
    short = get_historical_features(
        store, labels, ["item:ctr"], entity_column="item", time_column="ts", full_names=False
    )
    assert list(short.columns) == ["user", "item", "ts", "label", "ctr"]


def test_arrow_labels_timestamps_and_label_order(store: OfflineStore, writer: LakeWriter) -> None:
    _write(writer, [feature_update("u", "a", T0, T0, {"x": 1}), feature_update("u", "b", T0, T0, {"x": 2})])
    times = pa.array([T0 + 1, T0 - 1, T0 + 1], pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    labels = pa.table({"entity_key": ["b", "a", "a"], "label_time": times, "row": [0, 1, 2]})
    got = get_historical_features(store, labels, ["u:x"])
    assert isinstance(got, pa.Table)
    assert got.column("row").to_pylist() == [0, 1, 2]
    assert got.column("u:x").to_pylist() == [2.0, None, 1.0]


def test_bad_refs_and_labels_are_named(store: OfflineStore, writer: LakeWriter) -> None:
    _write(writer, [feature_update("u", "a", T0, T0, {"x": 1, "y": 2})])
    labels = _labels(("a", T0))
    with pytest.raises(NotFoundError, match=r"unknown feature refs u:z, v:x.*known: u:x, u:y"):
        get_historical_features(store, labels, ["u:x", "u:z", "v:x"])
    with pytest.raises(ConfigError, match="not '<feature_set>:<feature>'"):
        get_historical_features(store, labels, ["ux"])
    with pytest.raises(ConfigError, match="no column 'when'"):
        get_historical_features(store, labels, ["u:x"], time_column="when")


def _reference(updates: list[dict[str, Any]], entity: str, t: int, bitemporal: bool) -> Any:
    eligible = [
        (u["event_time"], u["write_time"], i, u["values"]["x"])
        for i, u in enumerate(updates)
        if u["entity_key"] == entity and u["event_time"] <= t and (not bitemporal or u["write_time"] <= t)
    ]
    return max(eligible)[3] if eligible else None


def test_random_histories_match_a_reference_implementation(store: OfflineStore, writer: LakeWriter) -> None:
    rng = random.Random(7)
    updates = []
    for n in range(600):
        event = T0 + rng.randrange(0, 1000)
        write = event + rng.choice([0, 0, 1, rng.randrange(0, 400)]) - rng.choice([0, 0, 0, 5])  # skew too
        updates.append(feature_update("u", f"e{rng.randrange(12)}", event, write, {"x": n}, n=n))
    _write(writer, updates)
    labels = _labels(*[(f"e{rng.randrange(14)}", T0 + rng.randrange(-50, 1300)) for _ in range(800)])
    for bitemporal in (True, False):
        got = _values(get_historical_features(store, labels, ["u:x"], bitemporal=bitemporal), "u:x")
        want = [
            _reference(updates, e, t, bitemporal)
            for e, t in zip(labels["entity_key"], labels["label_time"], strict=True)
        ]
        assert got == [None if w is None else float(w) for w in want], f"bitemporal={bitemporal}"


def test_feature_added_later_is_null_before_not_zero(store: OfflineStore, writer: LakeWriter) -> None:
    writer.write("feature-updates", [(0, 0, feature_update("u", "a", T0, T0, {"x": 1}))])
    writer.write("feature-updates", [(0, 1, feature_update("u", "a", T0 + 10, T0 + 10, {"x": 2, "y": 5}))])
    got = get_historical_features(store, _labels(("a", T0 + 5), ("a", T0 + 20)), ["u:x", "u:y"])
    assert _values(got, "u:x") == [1.0, 2.0]
    assert _values(got, "u:y") == [None, 5.0]


def test_values_keep_their_types(store: OfflineStore, writer: LakeWriter) -> None:
    big = 2**62 + 1  # not a double: only an integer column returns it exactly
    _write(
        writer,
        [
            feature_update("u", "a", T0, T0, {"n": 3, "x": 1.5, "ok": True, "s": "gold"}),
            feature_update("u", "b", T0, T0, {"n": big, "x": 2.0, "ok": False, "s": ""}),
        ],
    )
    labels = _labels(("a", T0), ("b", T0), ("nobody", T0), ("a", T0 - 1))
    refs = ["u:n", "u:x", "u:ok", "u:s"]
    got = get_historical_features(store, labels, refs)
    assert {ref: str(got[ref].dtype) for ref in refs} == {
        "u:n": "Int64",
        "u:x": "float64",
        "u:ok": "boolean",
        "u:s": str(pd.Series(["a"]).dtype),  # pandas' own string type
    }
    assert _values(got, "u:n") == [3, big, None, None]
    assert _values(got, "u:ok") == [True, False, None, None]
    assert _values(got, "u:s") == ["gold", "", None, None]
    assert _values(got, "u:x") == [1.5, 2.0, None, None]
    arrow = get_historical_features(store, pa.Table.from_pandas(labels, preserve_index=False), refs)
    assert [arrow.schema.field(ref).type for ref in refs] == [
        pa.int64(),
        pa.float64(),
        pa.bool_(),
        pa.string(),
    ]
    assert arrow.column("u:n").to_pylist() == [3, big, None, None]


def test_a_feature_typed_differently_in_two_files_comes_back_in_the_wider_type(
    store: OfflineStore, writer: LakeWriter
) -> None:
    writer.write("feature-updates", [(0, 0, feature_update("u", "a", T0, T0, {"n": 3}))])  # an Int64 file
    writer.write("feature-updates", [(0, 1, feature_update("u", "b", T0, T0, {"n": 2.5}))])  # a Float64 one
    got = get_historical_features(store, _labels(("a", T0), ("b", T0)), ["u:n"])
    assert (str(got["u:n"].dtype), _values(got, "u:n")) == ("float64", [3.0, 2.5])


def test_labels_far_apart_in_time_are_matched_the_same(store: OfflineStore, writer: LakeWriter) -> None:
    # Times 2^62 ms apart cannot be packed with the entity into one int64: ranks stand in for them.
    far = 2**62
    _write(
        writer,
        [feature_update("u", "a", -far, -far, {"x": 1}), feature_update("u", "a", far, far, {"x": 2})],
    )
    labels = _labels(("a", -far - 1), ("a", 0), ("a", far), ("b", far))
    for bitemporal in (True, False):
        got = get_historical_features(store, labels, ["u:x"], bitemporal=bitemporal)
        assert _values(got, "u:x") == [None, 1, 2, None]


def test_more_entities_than_one_radix_digit_holds(store: OfflineStore, writer: LakeWriter) -> None:
    # Entities are sorted by their 16-bit digits: labels naming 70,000 of them take two passes.
    rng = random.Random(3)
    entities = [f"e{i}" for i in range(70_000)]
    chosen = sorted(rng.sample(range(70_000), 150))
    updates = [
        feature_update("u", entities[i], T0 + t, T0 + t, {"x": i * 10 + t}, n=t)
        for i in chosen
        for t in (0, 5)
    ]
    _write(writer, updates)
    labels = _labels(*[(e, T0 + 3) for e in entities])
    got = _values(get_historical_features(store, labels, ["u:x"]), "u:x")
    want = [i * 10 if i in set(chosen) else None for i in range(70_000)]
    assert got == want
