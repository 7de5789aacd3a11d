"""The embedded offline store: views over an empty and a growing lake, many processes at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from batch.offline_store import OfflineStore, QueryError, open_offline_store
from batch.offline_store.base import render_params
from headwater.errors import NotFoundError
from headwater.settings import Settings
from processors.lake import LakeWriter, event_columns
from streams.catalog import SchemaCatalog
from streams.topics import TOPICS
from tests.offline_store.conftest import T0, click, feature_update
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _count(store: OfflineStore, table: str) -> int:
    n: int = store.query(f"SELECT count() AS n FROM {table}").column("n")[0].as_py()
    return n


def test_every_topic_is_a_view_with_schema_columns_even_without_files(
    store: OfflineStore, catalog: SchemaCatalog
) -> None:
    assert store.tables() == sorted(s.logical.replace("-", "_") for s in TOPICS)
    for spec in TOPICS:
        table = spec.logical.replace("-", "_")
        result = store.query(f"SELECT * FROM {table}")
        expected = [
            c.name for c in event_columns(spec.event_type, catalog.latest(spec.event_type).raw).columns
        ]
        assert result.num_rows == 0
        assert result.column_names == expected, table


def test_views_see_files_written_after_they_were_created(store: OfflineStore, writer: LakeWriter) -> None:
    assert _count(store, "clicks") == 0
    writer.write("clicks", [(0, o, click(o)) for o in range(25)])
    assert _count(store, "clicks") == 25
    writer.write("clicks", [(1, o, {**click(o, user="u2"), "event_id": f"u2-{o}"}) for o in range(5)])
    result = store.query(
        "SELECT user_id, count() AS n, sum(position) AS p FROM clicks GROUP BY user_id ORDER BY user_id"
    )
    assert result.to_pylist() == [{"user_id": "u1", "n": 25, "p": 49}, {"user_id": "u2", "n": 5, "p": 9}]
    # A rewrite of the same offsets with other content is seen (no stale row-count cache).
    writer.write("clicks", [(0, o, click(o, user="u3")) for o in range(10)])
    assert _count(store, "clicks") == 30
    assert store.query("SELECT uniqExact(_partition, _offset) AS n FROM clicks").column("n")[0].as_py() == 30


def test_sql_reads_feature_values_as_typed_columns_and_maps(store: OfflineStore, writer: LakeWriter) -> None:
    values = {"clicks": 3, "ok": True, "last": "item9", "none": None}
    writer.write("feature-updates", [(0, 0, feature_update("u", "a", T0, T0 + 5, values))])
    row = store.query(
        "SELECT `u:clicks` AS c, `u:ok` AS ok, `u:last` AS last, value_keys FROM feature_updates"
    ).to_pylist()[0]
    assert row == {"c": 3, "ok": True, "last": "item9", "value_keys": '["clicks","ok","last","none"]'}
    assert store.extra_columns("feature_updates") == {
        "u:clicks": "Nullable(Int64)",
        "u:last": "Nullable(String)",
        "u:ok": "Nullable(Bool)",
    }
    # A later file types the feature double and adds one: the same store's view reads both files.
    writer.write(
        "feature-updates", [(0, 1, feature_update("u", "a", T0 + 1, T0 + 6, {"clicks": 2.5, "new": 1}))]
    )
    rows = store.query("SELECT `u:clicks` AS c, `u:new` AS n FROM feature_updates ORDER BY event_time")
    assert rows.to_pylist() == [{"c": 3.0, "n": None}, {"c": 2.5, "n": 1}]
    writer.write("clicks", [(0, 0, click(0))])
    got = store.query(
        "SELECT user_features['age'] AS age FROM clicks WHERE user_id = {u:String}", {"u": "u1"}
    )
    assert got.column("age").to_pylist() == ["20"]


def test_bad_sql_and_unknown_tables_say_what_is_wrong(store: OfflineStore) -> None:
    with pytest.raises(QueryError, match=r"UNKNOWN_TABLE|Unknown table"):
        store.query("SELECT * FROM no_such_topic")
    with pytest.raises(NotFoundError, match="known: alerts"):
        store.relation("no_such_topic")


def test_stores_in_one_process_are_independent(
    tmp_path: Path, catalog: SchemaCatalog, writer: LakeWriter
) -> None:
    from headwater.settings import load_settings

    writer.write("clicks", [(0, 0, click(0))])
    other = load_settings(data_dir=tmp_path / "other")
    with open_offline_store(writer_settings(writer), catalog) as a, open_offline_store(other, catalog) as b:
        assert (_count(a, "clicks"), _count(b, "clicks")) == (1, 0)


def test_views_are_made_when_a_statement_names_them(store: OfflineStore, writer: LakeWriter) -> None:
    writer.write("clicks", [(0, 0, click(0))])
    # A view of the user's over a topic's view, and a column or a path named like a topic: all work.
    store.execute("CREATE VIEW mine AS SELECT user_id FROM clicks")
    assert store.query("SELECT count() AS n FROM mine").column("n")[0].as_py() == 1
    assert store.query("SELECT 1 AS outcomes_seen FROM feature_updates").num_rows == 0
    listed = store.query("SHOW TABLES").column("name").to_pylist()
    assert sorted(listed) == sorted([*store.tables(), "mine"])


def test_stores_opened_one_after_another_start_clean(lake_settings: Settings, catalog: SchemaCatalog) -> None:
    # The engine outlives the stores; each store's session, database and settings are its own.
    for _ in range(3):
        with open_offline_store(lake_settings, catalog) as s:
            s.execute("CREATE TEMPORARY TABLE t (x Int32) ENGINE = Memory")
            s.execute("INSERT INTO t VALUES (1)")
            assert _count(s, "t") == 1
            assert _count(s, "clicks") == 0


def writer_settings(writer: LakeWriter) -> Settings:
    from headwater.settings import load_settings

    return load_settings(data_dir=writer.root.parent, offline_store={"lake_dir": writer.root})


READER = textwrap.dedent(
    """
    import json, os, pathlib, sys, time
    from headwater.settings import load_settings
    from batch.offline_store import open_offline_store
    settings = load_settings(data_dir=sys.argv[1])
    seen = []
    with open_offline_store(settings) as store:
        pathlib.Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        pathlib.Path(sys.argv[1], f"reader-ready-{os.getpid()}").touch()  # its engine is open
        deadline = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < deadline:
            row = store.query(
                "SELECT count() AS n, uniqExact(_partition, _offset) AS u, max(_offset) AS m FROM clicks"
            ).to_pylist()[0]
            seen.append([row["n"], row["u"], row["m"]])
    print(json.dumps(seen))
    """
)


def test_processes_query_the_lake_while_the_sink_writes(lake_settings: Settings, writer: LakeWriter) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(lake_settings.data_dir), "4"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    # Both engines open before the writes start (a shared chdb directory lock would fail the second).
    ready = [Path(lake_settings.data_dir, f"reader-ready-{proc.pid}") for proc in readers]
    wait_for(lambda: all(r.exists() for r in ready), timeout_s=60, what="both readers to open the lake")
    offset, batch = 0, 40
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        writer.write("clicks", [(0, o, click(o)) for o in range(offset, offset + batch)])
        offset += batch
    results = []
    for proc in readers:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        results.append(json.loads(out))
    for seen in results:
        assert len(seen) >= 5, "a reader barely ran"
        counts = [n for n, _u, _m in seen]
        assert counts == sorted(counts), "a reader saw rows disappear"
        assert all(n == u for n, u, _m in seen), "a reader saw a duplicated or partial file"
        assert all(n == 0 or m == n - 1 for n, _u, m in seen), "a reader saw a gap"
        assert max(counts) > 0
    assert _count_files(lake_settings) == offset // batch


def _count_files(settings: Settings) -> int:
    return len(list((settings.lake_dir / "clicks").rglob("*.parquet")))


def test_render_params_for_drivers_without_server_side_binding() -> None:
    sql = "SELECT {a:String}, {b:Int64}, {c:Array(String)}, {d:Identifier}, {e:Nullable(Float64)}"
    got = render_params(sql, {"a": "it's", "b": 3, "c": ["x", "y"], "d": "my col", "e": None})
    assert got == (
        "SELECT CAST('it\\'s', 'String'), CAST(3, 'Int64'), CAST(['x', 'y'], 'Array(String)'), "
        "`my col`, CAST(NULL, 'Nullable(Float64)')"
    )
    with pytest.raises(QueryError, match="has no value"):
        render_params("SELECT {x:Int8}", {"y": 1})
