"""A processor rejects the record at fault and keeps the rest; a broken store or disk stops it.

Real lake files (Parquet through the lake writer, read back with the lake reader), real LMDB
(online store and processor state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import pyarrow as pa
import pytest

from headwater.settings import load_settings
from processors.lake import LakeReader, LakeWriter
from processors.lake_sink import LakeSink
from processors.online_writer import OnlineStoreWriter
from processors.runtime import record_fault
from processors.state_store import StateStore
from serving.online_store import OnlineStoreError, open_online_store
from streams.catalog import SchemaCatalog
from streams.consumer import Event
from streams.serde import Serde
from tests.processors.test_feature_processors import clickstream  # noqa: F401 - a fixture


def events_of(topic: str, event_type: str, records: list[dict[str, Any]], serde: Serde) -> list[Event]:
    out = []
    for offset, record in enumerate(records):
        value = serde.encode(event_type, record) if record.get("position", 0) < 2**31 else b"as-read"
        key = str(record.get("user_id") or record.get("entity_key")).encode()
        out.append(Event(topic, 0, offset, key, event_type, record, {}, 0, value))
    return out


def test_a_row_the_lake_refuses_is_rejected_and_the_rest_of_its_file_archived(
    tmp_path: Path,
    serde: Serde,
    clickstream: list[dict[str, Any]],  # noqa: F811 - the fixture
) -> None:
    settings = load_settings(data_dir=tmp_path)
    catalog = SchemaCatalog.load(settings.schemas_dir)
    sink = LakeSink(LakeWriter(settings, catalog))
    clicks = [dict(c) for c in clickstream[:500]]
    clicks[123]["position"] = 2**40  # what a lenient decoder let through: no int32 column holds it
    events = events_of("clicks", "click", clicks, serde)
    events[300] = Event("clicks", 0, 300, b"\xff\xfe", "click", clicks[300], {}, 0, b"x")  # key not text
    effects = sink.handle(events, 0)
    assert [(e.offset, type(x).__name__) for e, x in effects.rejected] == [(300, "UnicodeDecodeError")]
    rejected = sink.flush_effects()
    assert [(e.offset, e.record["position"]) for e, _ in rejected] == [(123, 2**40)]
    assert isinstance(rejected[0][1], pa.ArrowException | OverflowError | ValueError)
    table = LakeReader(settings, catalog).read_topic("clicks")
    assert sorted(table["_offset"].to_pylist()) == [o for o in range(500) if o not in (123, 300)]


def test_a_lake_that_cannot_be_written_stops_the_sink(tmp_path: Path, serde: Serde) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings = load_settings(data_dir=tmp_path, offline_store={"lake_dir": blocker})
    sink = LakeSink(LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir)))
    update = {
        "event_id": "u", "feature_set": "user_activity", "feature_set_version": 1, "entity_key": "u1",
        "event_time": 1, "write_time": 1, "values": {"clicks_7d": 1}, "source": "STREAM",
    }  # fmt: skip
    sink.handle(events_of("feature-updates", "feature_update", [update], serde), 0)
    with pytest.raises(OSError) as failed:
        sink.flush_effects()
    assert not record_fault(failed.value)


def test_the_online_store_writer_rejects_only_the_rows_the_store_refuses(
    tmp_path: Path, serde: Serde
) -> None:
    settings = load_settings(data_dir=tmp_path)
    updates = [
        {
            "event_id": f"e{i}", "feature_set": "user_activity", "feature_set_version": 1,
            "entity_key": "k" * 600 if i == 2 else f"user-{i}", "event_time": 10 + i, "write_time": 1,
            "values": {"clicks_7d": i}, "source": "STREAM",
        }
        for i in range(5)
    ]  # fmt: skip
    with open_online_store(settings) as store:
        writer = OnlineStoreWriter(store)
        assert not writer.handle(events_of("feature-updates", "feature_update", updates, serde), 0).rejected
        rejected = writer.flush_effects()
        assert [(e.offset, type(x).__name__) for e, x in rejected] == [(2, "OnlineStoreError")]
        rows = store.get_batch("user_activity", [f"user-{i}" for i in range(5)], ["clicks_7d"], now_ms=100)
        assert [row.values.get("clicks_7d") for row in rows] == [0, 1, None, 3, 4]


def test_a_full_online_store_stops_the_writer(tmp_path: Path, serde: Serde) -> None:
    """A store that cannot take writes (its LMDB map full) is no fault of the rows: the writer
    raises, rather than dead-lettering every valid update one by one."""
    local = load_settings(data_dir=tmp_path, online_store={"map_size_mb": 16})
    updates = [
        {
            "event_id": f"e{i}", "feature_set": "user_activity", "feature_set_version": 1,
            "entity_key": f"user-{i}", "event_time": 5, "write_time": 1, "values": {"blob": "x" * 2000},
            "source": "STREAM",
        }
        for i in range(10_000)
    ]  # fmt: skip
    with open_online_store(local) as store:
        writer = OnlineStoreWriter(store)
        writer.handle(events_of("feature-updates", "feature_update", updates, serde), 0)
        with pytest.raises(OnlineStoreError) as failed:
            writer.flush_effects()
        assert not record_fault(failed.value)


def test_state_keys_longer_than_lmdb_keys(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    try:
        keys = ["short", "i" * 600, "é" * 400, "\x01looks-reserved", "\x00also"]
        store.commit({k: k.encode()[-8:] for k in keys}, {("clicks", 0): 7})
        assert [store.get(k) for k in keys] == [k.encode()[-8:] for k in keys]
        assert sorted(store.state_keys()) == sorted(keys)
        store.commit({keys[1]: None}, {})
        assert store.get(keys[1]) is None and sorted(store.state_keys()) == sorted(keys[:1] + keys[2:])
        assert store.positions() == {("clicks", 0): 7}
    finally:
        store.close()


def test_record_faults_and_environment_failures() -> None:
    def chained(outer: Exception, cause: BaseException) -> Exception:
        try:
            raise outer from cause
        except Exception as exc:
            return exc

    assert record_fault(ValueError("bad value"))
    assert record_fault(chained(OnlineStoreError("cannot encode"), TypeError("x")))
    assert not record_fault(PermissionError("read-only"))
    assert not record_fault(lmdb.CorruptedError("page"))
    assert not record_fault(chained(OnlineStoreError("LMDB write failed"), lmdb.MapFullError("full")))
    assert not record_fault(MemoryError())
