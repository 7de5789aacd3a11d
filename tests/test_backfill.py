"""Backfill: the ClickHouse backfill of the real clickstream into the lake and the online store.

The sample clickstream (all three campaigns, 30,130 click events) is archived with the lake
sink's ``LakeWriter``; the backfill computes from it in chdb, writes Parquet and LMDB for
real. The reference is the pure streaming engine (``features.engine.Aggregator``) fed the
same events in event-time order: its last update per (entity, event time) and its latest
update per entity.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from batch.backfill import PARTITION_BASE, backfill
from batch.materialize import materialize
from batch.offline_store import get_historical_features, open_offline_store
from features.engine import Aggregator, evaluate_tiles
from features.examples.clickstream import repository
from headwater.errors import ConfigError, NotFoundError
from headwater.sample_data import merged_events
from headwater.settings import Settings, load_settings
from processors.lake import LakeReader, LakeWriter
from serving.online_store import open_online_store
from streams.catalog import SchemaCatalog
from tests.features.oracle import same_tiles

DAY = 86_400_000
SETS = ["user_activity", "item_activity"]
Values = dict[str, Any]


@pytest.fixture(scope="module")
def clicks() -> list[dict[str, Any]]:
    return [record for topic, record in merged_events() if topic == "clicks"]


@pytest.fixture(scope="module")
def engine_updates(clicks: list[dict[str, Any]]) -> dict[str, dict[tuple[str, int], dict[str, Any]]]:
    """Per feature set, the engine's last update per (entity, event time)."""
    out: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for name in SETS:
        aggregator, last = Aggregator(repository().feature_set(name)), {}
        for record in clicks:
            for update in aggregator.apply(record, write_time=0):
                last[(update["entity_key"], update["event_time"])] = update
        out[name] = last
    return out


@pytest.fixture(scope="module")
def expected(
    engine_updates: dict[str, dict[tuple[str, int], dict[str, Any]]],
) -> dict[str, dict[tuple[str, int], Values]]:
    """Per feature set, the values of the engine's last update per (entity, event time)."""
    return {name: {k: u["values"] for k, u in updates.items()} for name, updates in engine_updates.items()}


@pytest.fixture(scope="module")
def clicks_lake(clicks: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample archived as the sink archives it: three partitions."""
    data_dir = tmp_path_factory.mktemp("clicks-lake")
    settings = load_settings(data_dir=data_dir)
    LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir)).write(
        "clicks", [(i % 3, i // 3, record) for i, record in enumerate(clicks)]
    )
    return settings.lake_dir / "clicks"


@pytest.fixture()
def lake_settings(tmp_path: Path, clicks_lake: Path) -> Settings:
    settings = load_settings(data_dir=tmp_path / "data")
    shutil.copytree(clicks_lake, settings.lake_dir / "clicks")
    return settings


def lake_rows(settings: Settings, feature_set: str) -> pd.DataFrame:
    """The feature set's updates as the lake reader rebuilds them (exact Avro values)."""
    reader = LakeReader(settings, SchemaCatalog.load(settings.schemas_dir))
    rows = [
        {**{k: r.record[k] for k in ("entity_key", "event_time", "write_time", "values", "source")},
         "_partition": r.partition, "_offset": r.offset}
        for r in reader.iter_records("feature-updates")
        if r.record["feature_set"] == feature_set
    ]  # fmt: skip
    return pd.DataFrame(rows).sort_values(["entity_key", "event_time"], ignore_index=True)


def as_updates(rows: pd.DataFrame) -> dict[tuple[str, int], Values]:
    keys = zip(rows["entity_key"], rows["event_time"].astype(int), strict=True)
    return {(k, t): v for (k, t), v in zip(keys, rows["values"], strict=True)}


def latest_per_entity(updates: dict[tuple[str, int], Values]) -> dict[str, tuple[int, Values]]:
    latest: dict[str, tuple[int, Values]] = {}
    for (key, t), values in sorted(updates.items()):
        latest[key] = (t, values)
    return latest


def online(
    settings: Settings, feature_set: str, keys: list[str], now_ms: int
) -> dict[str, tuple[int | None, Values]]:
    names = repository().feature_set(feature_set).feature_names
    with open_online_store(settings) as store:
        rows = store.get_batch(feature_set, keys, names, now_ms=now_ms)
    return {k: (r.event_time_ms, r.values) for k, r in zip(keys, rows, strict=True)}


@pytest.mark.parametrize("name", SETS)
def test_backfill_equals_the_streaming_engine_at_every_update_time(
    name: str,
    lake_settings: Settings,
    expected: dict[str, dict[tuple[str, int], Values]],
    engine_updates: dict[str, dict[tuple[str, int], dict[str, Any]]],
    clicks: list[Any],
) -> None:
    result = backfill(lake_settings, name, 0, 2**45)
    want = expected[name]
    rows = lake_rows(lake_settings, name)
    assert (result.updates, len(rows)) == (len(want), len(want)) and len(want) > 29_000
    # Every value, every update time: ints stay ints, doubles doubles, nulls null (the lake
    # reader rebuilds the exact Avro map a replay would produce).
    assert as_updates(rows) == want
    assert set(rows["source"]) == {"BACKFILL"} and rows["write_time"].nunique() == 1
    assert (rows["_partition"] >= PARTITION_BASE).all()

    # Each row carries the stream's tiles.
    with open_offline_store(lake_settings) as store:
        tiles = store.query(
            "SELECT entity_key, event_time, valid_until, tiles FROM feature_updates "
            "WHERE feature_set = {fs:String}",
            {"fs": name},
        )
    tiles = tiles.set_column(3, "tiles", tiles.column("tiles").cast(pa.binary())).to_pylist()
    updates = engine_updates[name]
    assert len(tiles) == len(updates)
    for row in tiles:
        update = updates[(row["entity_key"], row["event_time"])]
        assert row["valid_until"] == update["valid_until"] and same_tiles(row["tiles"], update["tiles"]), row

    # The online store holds each entity's latest values, read as of the last event (the
    # sample is from 2019 and TTL is by event time): every window evaluated then.
    latest = latest_per_entity(want)
    assert result.entities == result.online_written == len(latest)
    now = clicks[-1]["event_time"]
    read = {k: (t, evaluate_tiles(updates[(k, t)]["tiles"], now)[0]) for k, (t, _) in latest.items()}
    assert online(lake_settings, name, sorted(latest), now) == read
    assert not any(v[0] for v in online(lake_settings, name, sorted(latest)[:5], 2**52).values())  # TTL


def test_a_backfill_never_overwrites_a_newer_streaming_value(
    lake_settings: Settings, expected: dict[str, dict[tuple[str, int], Values]], clicks: list[Any]
) -> None:
    latest = latest_per_entity(expected["item_activity"])
    newer_key, older_key, *_ = sorted(latest)
    streamed = {"clicks_24h": 999}
    with open_online_store(lake_settings) as store:
        store.put_batch(
            "item_activity",
            [
                (newer_key, latest[newer_key][0] + 1, streamed),
                (older_key, latest[older_key][0] - 1, streamed),
            ],
            ttl_s=7 * 86_400,
        )
    result = backfill(lake_settings, "item_activity", 0, 2**45)
    assert result.online_written == len(latest) - 1
    now = clicks[-1]["event_time"]
    got = online(lake_settings, "item_activity", [newer_key, older_key], now)
    assert got[newer_key][0] == latest[newer_key][0] + 1 and got[newer_key][1]["clicks_24h"] == 999
    assert got[older_key] == latest[older_key]


def test_materialize_copies_each_entitys_latest_offline_values_online(
    lake_settings: Settings,
    expected: dict[str, dict[tuple[str, int], Values]],
    engine_updates: dict[str, dict[tuple[str, int], dict[str, Any]]],
    clicks: list[Any],
) -> None:
    backfill(lake_settings, "item_activity", 0, 2**45, online=False)  # the history, offline only
    # A range: the latest update of each entity before a cut, as Feast's materialize would copy.
    cut = clicks[len(clicks) // 2]["event_time"]
    before = {k: v for k, v in expected["item_activity"].items() if k[1] < cut}
    latest = latest_per_entity(before)
    newer = sorted(latest)[0]
    with open_online_store(lake_settings) as store:  # the stream already wrote a newer value
        store.put_batch("item_activity", [(newer, cut + 1, {"clicks_24h": 999})], ttl_s=7 * 86_400)
    result = materialize(lake_settings, repository(), "item_activity", 0, cut)
    assert (result.entities, result.written) == (len(latest), len(latest) - 1)
    got = online(lake_settings, "item_activity", sorted(latest), cut)
    assert got.pop(newer)[0] == cut + 1  # newer-wins
    # With their tiles: read at the cut, every window is evaluated then.
    updates = engine_updates["item_activity"]
    read = {k: (t, evaluate_tiles(updates[(k, t)]["tiles"], cut)[0]) for k, (t, _) in latest.items()}
    assert got == {k: v for k, v in read.items() if k != newer}
    assert read != latest  # some windows lost tiles by the cut
    with pytest.raises(NotFoundError, match="known"):
        materialize(lake_settings, repository(), "nosuch", 0, cut)


def test_rerunning_a_backfill_replaces_rows_instead_of_duplicating_them(
    lake_settings: Settings, expected: dict[str, dict[tuple[str, int], Values]], clicks: list[Any]
) -> None:
    first_day = clicks[0]["event_time"] // DAY * DAY
    want = expected["user_activity"]

    def in_range(lo: int, hi: int) -> dict[tuple[str, int], Values]:
        return {k: v for k, v in want.items() if lo <= k[1] < hi}

    a, b = (first_day + 1 * DAY + 6 * 3_600_000, first_day + 3 * DAY)  # mid-day start
    first = backfill(lake_settings, "user_activity", a, b, online=False)
    again = backfill(lake_settings, "user_activity", a, b, online=False)
    assert first.lake_files == again.lake_files and len(first.lake_files) == 2
    rows = lake_rows(lake_settings, "user_activity")
    assert as_updates(rows) == in_range(a, b) and len(rows) == len(in_range(a, b))
    assert set(rows["write_time"]) == {again.write_time_ms}  # the rerun's rows replaced the first's

    c, d = first_day + 2 * DAY, first_day + 5 * DAY  # overlaps the first range's last day
    overlapping = backfill(lake_settings, "user_activity", c, d, online=False)
    rows = lake_rows(lake_settings, "user_activity")
    assert as_updates(rows) == in_range(a, d) and len(rows) == len(in_range(a, d))
    assert len(rows.drop_duplicates(["_partition", "_offset"])) == len(rows)  # lake row ids stay unique
    kept = rows[rows["event_time"] < c]  # outside the second range: rows of the earlier run, kept
    assert set(kept["write_time"]) == {again.write_time_ms} and len(kept) == len(in_range(a, c))
    assert set(rows[rows["event_time"] >= c]["write_time"]) == {overlapping.write_time_ms}
    day_files = sorted(p.name for p in (lake_settings.lake_dir / "feature-updates").glob("*/*.parquet"))
    assert len(day_files) == 4  # one file per day, days 1-4


def test_backfilled_values_serve_point_in_time_training_sets(
    lake_settings: Settings, expected: dict[str, dict[tuple[str, int], Values]]
) -> None:
    for name in SETS:
        backfill(lake_settings, name, 0, 2**45, online=False)
    with open_offline_store(lake_settings) as store:
        ids = store.query_df("SELECT _partition, _offset FROM feature_updates")
        assert not ids.duplicated().any()  # two feature sets on the same days: separate slots
        rng = random.Random(3)
        picks = rng.sample(sorted(expected["item_activity"]), 50)
        labels = pd.DataFrame({"entity_key": [k for k, _ in picks], "label_time": [t for _, t in picks]})
        # Backfilled values were written now, after every label: only the event-time view sees them.
        frame = get_historical_features(
            store, labels, ["item_activity:clicks_24h", "item_activity:last_click_time_7d"], bitemporal=False
        )
        assert (
            get_historical_features(store, labels, ["item_activity:clicks_24h"])["item_activity:clicks_24h"]
            .isna()
            .all()
        )
    for (key, t), clicks_24h, last_click in zip(
        picks, frame["item_activity:clicks_24h"], frame["item_activity:last_click_time_7d"], strict=True
    ):
        values = expected["item_activity"][(key, t)]
        assert clicks_24h == values["clicks_24h"]
        assert (pd.isna(last_click) and values["last_click_time_7d"] is None) or last_click == values[
            "last_click_time_7d"
        ]


def test_bad_input_names_what_is_known(lake_settings: Settings) -> None:
    with pytest.raises(NotFoundError, match="known: user_activity, item_activity"):
        backfill(lake_settings, "user_activty", 0, DAY)
    with pytest.raises(ConfigError, match="not after"):
        backfill(lake_settings, "user_activity", DAY, DAY)
    with pytest.raises(ConfigError, match="epoch ms"):
        backfill(lake_settings, "user_activity", -5, DAY)
