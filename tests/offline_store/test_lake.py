"""The lake writer: layout, idempotent rewrites, crashes, broker epochs, reading back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwater.settings import Settings, load_settings
from processors.lake import FileName, LakeReader, LakeRow, LakeWriter, event_columns, plan_files
from processors.lake.layout import superseded
from streams.catalog import SchemaCatalog
from tests.avro_strategies import strategy_for
from tests.offline_store.conftest import T0, click, feature_update
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _files(lake: Path, topic: str) -> list[str]:
    return sorted(str(p.relative_to(lake)) for p in (lake / topic).rglob("*.parquet"))


def _offsets(lake: Path, topic: str) -> list[int]:
    tables = [pq.read_table(p, columns=["_offset"]) for p in (lake / topic).rglob("*.parquet")]
    return sorted(o for t in tables for o in t.column("_offset").to_pylist())


# -- pure layout ---------------------------------------------------------------------------
def test_plan_files_names_every_file_of_a_batch_by_the_partitions_offset_range() -> None:
    day = 86_400_000
    rows = [
        (0, 10, click(0, event_time=T0)),
        (0, 11, click(1, event_time=T0 + day)),
        (1, 5, click(2, event_time=T0)),
        (0, 12, click(3, event_time=T0)),
    ]
    plans = plan_files("clicks", rows, now_ms=T0)
    assert [p.relpath for p in plans] == [
        "clicks/date=2023-11-14/clicks+0+10-12.parquet",
        "clicks/date=2023-11-15/clicks+0+10-12.parquet",
        "clicks/date=2023-11-14/clicks+1+5-5.parquet",
    ]
    assert [r.offset for r in plans[0].rows] == [10, 12]
    assert FileName.parse("clicks+0+10-12.parquet") == FileName(0, 10, 12, "clicks")
    assert FileName.parse(".clicks+0+10-12.parquet.123.tmp") is None


def test_superseded_takes_every_file_overlapping_transitively() -> None:
    existing = [FileName(0, a, b, "t") for a, b in [(0, 9), (10, 19), (15, 30), (31, 40), (28, 35)]]
    existing.append(FileName(1, 0, 100, "t"))
    chosen = superseded(existing, FileName(0, 12, 16, "t"))
    assert [(f.first, f.last) for f in chosen] == [(10, 19), (15, 30), (28, 35), (31, 40)]
    assert superseded(existing, FileName(0, 50, 60, "t")) == []


# -- writing -------------------------------------------------------------------------------
def test_same_offsets_twice_rewrite_the_same_files(writer: LakeWriter, lake_settings: Settings) -> None:
    lake = lake_settings.lake_dir
    batch = [(p, o, click(o)) for p in (0, 1) for o in range(50)]
    first = writer.write("clicks", batch)
    names = _files(lake, "clicks")
    again = writer.write("clicks", batch)
    assert sorted(first) == sorted(again)
    assert (
        _files(lake, "clicks")
        == names
        == [
            "clicks/date=2023-11-14/clicks+0+0-49.parquet",
            "clicks/date=2023-11-14/clicks+1+0-49.parquet",
        ]
    )
    assert len(_offsets(lake, "clicks")) == 100


def test_restart_with_other_batch_boundaries_never_duplicates(
    writer: LakeWriter, lake_settings: Settings
) -> None:
    lake = lake_settings.lake_dir
    day = 86_400_000
    rec = [click(o, event_time=T0 + (o % 3) * day) for o in range(200)]  # three date folders
    writer.write("clicks", [(0, o, rec[o]) for o in range(0, 100)])  # crashed run: 0-99 durable...
    writer.write("clicks", [(0, o, rec[o]) for o in range(100, 160)])  # ...and 100-159, never committed
    # The restarted sink resumes from the last commit (offset 40, say) with other boundaries.
    writer.write("clicks", [(0, o, rec[o]) for o in range(40, 130)])
    assert _offsets(lake, "clicks") == list(range(160))
    writer.write("clicks", [(0, o, rec[o]) for o in range(130, 200)])
    assert _offsets(lake, "clicks") == list(range(200))
    names = {p.rsplit("/", 1)[1] for p in _files(lake, "clicks")}
    assert names == {"clicks+0+0-39.parquet", "clicks+0+40-129.parquet", "clicks+0+130-199.parquet"}
    # Every name holds rows of its own range only, whatever the date folder.
    for rel in _files(lake, "clicks"):
        f = FileName.parse(rel.rsplit("/", 1)[1])
        assert f is not None
        offsets = pq.read_table(lake / rel, columns=["_offset"]).column("_offset").to_pylist()
        assert all(f.first <= o <= f.last for o in offsets)


def test_left_over_temporary_file_is_ignored_then_cleaned(
    writer: LakeWriter, lake_settings: Settings, store: Any
) -> None:
    writer.write("clicks", [(0, o, click(o)) for o in range(10)])
    folder = lake_settings.lake_dir / "clicks" / "date=2023-11-14"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    tmp = folder / f".clicks+0+10-19.parquet.{int(dead.stdout)}.tmp"
    tmp.write_bytes(b"PAR1 half a file")  # a writer killed mid-write
    assert store.query("SELECT count() AS n FROM clicks").column("n").to_pylist() == [10]
    fresh = LakeWriter(lake_settings, writer.catalog)  # the restarted sink
    fresh.write("clicks", [(0, o, click(o)) for o in range(10, 20)])
    assert not tmp.exists()
    assert store.query("SELECT count() AS n FROM clicks").column("n").to_pylist() == [20]


CRASHING_SINK = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from headwater.settings import load_settings
    from processors.lake import LakeWriter
    from streams.catalog import SchemaCatalog
    from tests.offline_store.conftest import click
    data_dir, start, batch, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    settings = load_settings(data_dir=data_dir)
    writer = LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir))
    commit = Path(data_dir) / "committed"
    offset = start
    while offset < end:
        last = min(offset + batch, end)
        writer.write("clicks", [(p, o, click(o)) for p in (0, 1) for o in range(offset, last)])
        commit.write_text(str(last))  # commit only after the files are durable
        offset = last
    """
)


def test_sigkill_mid_stream_then_restart_leaves_each_offset_once(lake_settings: Settings) -> None:
    data_dir = str(lake_settings.data_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SINK, data_dir, "0", "37", "100000"], env=env)
    commit = Path(data_dir) / "committed"
    wait_for(
        lambda: commit.exists() and int(commit.read_text() or 0) >= 300, 30, "the sink to commit 300 rows"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = int(commit.read_text())
    assert committed >= 300, "the sink made no progress before it was killed"
    end = committed + 150
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_SINK, data_dir, str(committed), "53", str(end)],
        env=env,
        timeout=60,
        check=True,
    )
    assert done.returncode == 0
    lake = lake_settings.lake_dir
    for p in (0, 1):
        offsets = sorted(
            o
            for f in (lake / "clicks").rglob(f"clicks+{p}+*.parquet")
            for o in pq.read_table(f, columns=["_offset"]).column("_offset").to_pylist()
        )
        assert offsets == list(range(end)), f"partition {p}"
    assert not list(lake.rglob("*.tmp"))


# -- epochs and reading back ------------------------------------------------------------------
def test_broker_epoch_keeps_old_files_and_skips_restored_copies(
    writer: LakeWriter, lake_settings: Settings, catalog: SchemaCatalog
) -> None:
    updates = [feature_update("u", f"e{i % 3}", T0 + i, T0 + i, {"x": i}) for i in range(10)]
    writer.write("feature-updates", [(0, i, u) for i, u in enumerate(updates)])
    reader = LakeReader(lake_settings, catalog)
    latest = reader.latest_records("feature-updates")
    assert [(r.key, r.offset, r.record["values"]) for r in latest] == [
        ("u|e1", 7, {"x": 7}),
        ("u|e2", 8, {"x": 8}),
        ("u|e0", 9, {"x": 9}),
    ]
    # The broker restarted empty; the restore produced the 3 latest records at offsets 0-2.
    assert writer.begin_epoch(restored={"feature-updates": {0: len(latest)}}) == 1
    restored = [(0, i, r.record) for i, r in enumerate(latest)]
    new = [
        (0, 3 + i, feature_update("u", "e0", T0 + 100 + i, T0 + 100 + i, {"x": 100 + i})) for i in range(2)
    ]
    writer.write("feature-updates", restored + new)
    table = reader.read_topic("feature-updates")
    assert table.column("_offset").to_pylist() == [*range(10), 13, 14]
    assert reader.latest_records("feature-updates")[-1].record["values"] == {"x": 101}
    assert len(reader.latest_records("feature-updates")) == 3
    assert json.loads((lake_settings.lake_dir / "_epochs.json").read_text())["epochs"][0]["base"] == {
        "feature-updates": {"0": 10}
    }


def test_read_topic_of_empty_lake_has_the_schema_columns(
    lake_settings: Settings, catalog: SchemaCatalog
) -> None:
    table = LakeReader(lake_settings, catalog).read_topic("models")
    assert table.num_rows == 0
    assert {"model_name", "_key", "_offset", "_ingest_time"} <= set(table.column_names)


@pytest.mark.parametrize(
    "event_type", ["click", "feature_update", "bandit_state", "model_event", "prediction"]
)
def test_every_record_round_trips_through_lake_columns(catalog: SchemaCatalog, event_type: str) -> None:
    schema = catalog.latest(event_type).raw
    cols = event_columns(event_type, schema)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(strategy_for(schema), min_size=1, max_size=5))
    def check(records: list[dict[str, Any]]) -> None:
        n = len(records)
        meta = {"_topic": ["t"] * n, "_partition": [0] * n, "_offset": list(range(n)), "_key": [None] * n,
                "_event_type": [event_type] * n, "_ingest_time": [0] * n}  # fmt: skip
        table = cols.to_table(records, meta)
        # Through a Parquet file, as the lake writes and reads it: every value in its Avro type.
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        assert cols.records(pq.read_table(pa.BufferReader(sink.getvalue()))) == records

    check()


def test_feature_values_become_typed_columns_named_like_refs(
    writer: LakeWriter, lake_settings: Settings, catalog: SchemaCatalog
) -> None:
    updates = [
        feature_update("u", "a", T0, T0, {"n": 3, "ok": True, "name": "x", "none": None}),
        feature_update("i", "b", T0, T0, {"n": 1.5}),
        feature_update("u", "c", T0, T0, {"n": 2.5, "ok": 7, "name": 4}),  # other types than row 0's
        feature_update("u", "d", T0, T0, {"name": "y"}),
    ]
    writer.write("feature-updates", [(0, i, u) for i, u in enumerate(updates)])
    (path,) = (lake_settings.lake_dir / "feature-updates").rglob("*.parquet")
    table = pq.read_table(path)
    assert {n: table.schema.field(n).type for n in table.column_names if ":" in n} == {
        "i:n": pa.float64(),
        "u:n": pa.float64(),  # a double in the batch: the column holds doubles, the 3 is listed
        "u:name": pa.string(),  # more strings than numbers: the 4 is "4" there, and listed
        "u:ok": pa.int64(),  # an int in the batch: True is 1 there, and listed
    }
    assert table.column("u:n").to_pylist() == [3.0, None, 2.5, None]
    assert table.column("u:ok").to_pylist() == [1, None, 7, None]
    assert table.column("u:name").to_pylist() == ["x", None, "4", "y"]
    exceptions = [[("n", "3"), ("ok", "true")], [], [("name", "4")], []]
    assert table.column("value_exceptions").to_pylist() == exceptions
    keys = ['["n","ok","name","none"]', '["n"]', '["n","ok","name"]', '["name"]']
    assert table.column("value_keys").to_pylist() == keys
    assert not any(name in table.column_names for name in ("values", "values_json", "u:none"))
    # Read back exactly: each value in the Avro type it was written as.
    records = [r.record for r in LakeReader(lake_settings, catalog).iter_records("feature-updates")]
    assert records == updates
    assert [type(v) for v in records[0]["values"].values()] == [int, bool, str, type(None)]


def test_lake_rows_accept_named_tuples_and_explicit_keys(writer: LakeWriter, lake_settings: Settings) -> None:
    writer.write("clicks", [LakeRow(2, 7, click(7), key="custom-key")])
    (path,) = (lake_settings.lake_dir / "clicks").rglob("*.parquet")
    row = pq.read_table(path).to_pylist()[0]
    assert (row["_key"], row["_partition"], row["_offset"], row["_topic"]) == ("custom-key", 2, 7, "clicks")
    assert row["_event_type"] == "click" and row["_ingest_time"] > T0


def test_restore_keeps_the_newest_feature_update_over_a_later_archived_backfill(tmp_path: Path) -> None:
    """A backfill (own lake partition, archived last) with an older event time must not win the restore."""
    cfg = load_settings(data_dir=tmp_path)
    catalog = SchemaCatalog.load(cfg.schemas_dir)
    writer = LakeWriter(cfg, catalog)

    def update(t: int, source: str) -> dict[str, Any]:
        return {
            "event_id": f"u1-{t}-{source}", "feature_set": "user_activity", "feature_set_version": 1,
            "entity_key": "u1", "event_time": t, "write_time": t + 5, "values": {"clicks_7d": t},
            "source": source,
        }  # fmt: skip

    writer.write("feature-updates", [(0, 0, update(100, "STREAM"))])
    writer.write(
        "feature-updates", [(2**23 + 19_000, 0, update(50, "BACKFILL"))]
    )  # written later, older value
    (latest,) = LakeReader(cfg, catalog).latest_records("feature-updates")
    assert (latest.record["event_time"], latest.record["source"]) == (100, "STREAM")


def test_a_feature_null_in_one_file_and_string_in_another_is_queryable(tmp_path: Path) -> None:
    """An all-null batch must not fix a column's type: string values in a later file still read."""
    from batch.offline_store import open_offline_store

    cfg = load_settings(data_dir=tmp_path)
    writer = LakeWriter(cfg, SchemaCatalog.load(cfg.schemas_dir))
    base = {"feature_set": "user_activity", "feature_set_version": 1, "entity_key": "u1", "source": "STREAM"}
    writer.write("feature-updates", [(0, 0, {**base, "event_id": "a", "event_time": 1, "write_time": 1,
                                             "values": {"last_item": None}})])  # fmt: skip
    writer.write("feature-updates", [(0, 1, {**base, "event_id": "b", "event_time": 2, "write_time": 2,
                                             "values": {"last_item": "14"}})])  # fmt: skip
    with open_offline_store(cfg) as store:
        relation = store.relation("feature_updates", store.extra_columns("feature_updates"))
        rows = store.query(
            f"SELECT `user_activity:last_item` AS v FROM {relation} ORDER BY event_time"
        ).to_pylist()
    assert rows == [{"v": None}, {"v": "14"}]


def test_files_of_the_earlier_format_still_read_exactly(
    writer: LakeWriter, lake_settings: Settings, catalog: SchemaCatalog
) -> None:
    """A lake written before the typed columns were the only copy: values as a map of doubles,
    as JSON, and as Float64/String columns. Restores, views and training sets still read it."""
    old = feature_update("u", "a", T0, T0, {"n": 3, "s": "x", "none": None})
    table = pa.table(
        {
            **{k: [old[k]] for k in ("event_id", "feature_set", "entity_key", "event_time", "write_time")},
            "feature_set_version": pa.array([1], pa.int32()),
            "values": pa.array([[("n", 3.0), ("none", None), ("s", None)]], pa.map_(pa.string(), pa.float64())),  # noqa: E501
            "values_json": ['{"n":3,"none":null,"s":"x"}'],
            "source": ["STREAM"],
            "_topic": ["feature-updates"], "_partition": pa.array([0], pa.int32()), "_offset": [0],
            "_key": ["u|a"], "_event_type": ["feature_update"], "_ingest_time": [T0],
            "u:n": [3.0], "u:s": ["x"],
        }
    )  # fmt: skip
    folder = lake_settings.lake_dir / "feature-updates" / "date=2023-11-14"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "feature-updates+0+0-0.parquet")
    new = feature_update("u", "a", T0 + 1, T0 + 1, {"n": 4, "s": "y", "none": None})
    writer.write("feature-updates", [(0, 1, new)])

    records = [r.record for r in LakeReader(lake_settings, catalog).iter_records("feature-updates")]
    assert records == [old, new] and type(records[0]["values"]["n"]) is int
    from batch.offline_store import get_historical_features, open_offline_store

    with open_offline_store(lake_settings, catalog) as store:
        rows = store.query("SELECT `u:n` AS n, `u:s` AS s FROM feature_updates ORDER BY event_time")
        assert rows.to_pylist() == [{"n": 3.0, "s": "x"}, {"n": 4.0, "s": "y"}]
        labels = pd.DataFrame({"entity_key": ["a", "a"], "label_time": [T0, T0 + 1]})
        got = get_historical_features(store, labels, ["u:n", "u:s"])
    assert list(got["u:n"]) == [3.0, 4.0] and list(got["u:s"]) == ["x", "y"]
