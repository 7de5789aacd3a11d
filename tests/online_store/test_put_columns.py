"""The contract of ``put_columns`` (the bulk write of backfills), on every reachable backend.

``put_columns(fs, table)`` must behave exactly as ``put_batch`` with one row per table row:
same values and types read back, newer-wins on event time (last write wins on ties), the
newest update per entity inside one batch, TTL by event time, the same rejections. The
encoder itself is checked against the row codec on msgpack's boundary values.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import random
from collections.abc import Callable
from typing import Any

import msgpack
import pyarrow as pa
import pytest

from headwater.settings import Settings
from serving.online_store import OnlineStore, OnlineStoreError, open_online_store
from serving.online_store.base import epoch_ms
from serving.online_store.codec import HEADER, RecordCodec
from serving.online_store.columnar import encode_columns, rows_of

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
PROCESS_TIMEOUT_S = 60.0
INTS = [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**63 - 1, -1, -32, -33, -128, -129]
INTS += [-32_768, -32_769, -(2**31), -(2**31) - 1, -(2**63)]


PutColumns = Callable[..., int]


@pytest.fixture(params=["native", "default"])
def put_columns(request: pytest.FixtureRequest, store: OnlineStore) -> PutColumns:
    """The backend's put_columns, or the interface's default implementation run on the backend."""
    if request.param == "native":
        return store.put_columns
    return functools.partial(OnlineStore.put_columns, store)


def _table(n: int = len(INTS)) -> pa.Table:
    """Every value type the store keeps, nulls and msgpack's size boundaries included."""
    strings: list[str | None] = ["", "a", "x" * 31, "x" * 32, "é" * 200, "y" * 256, "z" * 70_000, "✓", None]
    return pa.table(
        {
            "entity_key": [f"k{i:03d}" for i in range(n)],
            "event_time": [T0 + i for i in range(n)],
            "ints": INTS[:n],
            "small": [i % 100 for i in range(n)],
            "uint64": pa.array([[0, 127, 128, 2**16, 2**64 - 1, None][i % 6] for i in range(n)], pa.uint64()),
            "int8": pa.array([[1, -5, None][i % 3] for i in range(n)], pa.int8()),
            "floats": [[0.1, -0.0, math.inf, 1e300, None, 2.5][i % 6] for i in range(n)],
            "float32": pa.array([0.5] * n, pa.float32()),
            "flags": [[True, False, None][i % 3] for i in range(n)],
            "strings": [strings[i % len(strings)] for i in range(n)],
            "nothing": pa.nulls(n),
        }
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def test_records_decode_exactly_as_the_row_codecs() -> None:
    table = _table()
    codec = RecordCodec()
    batch = encode_columns(codec, "fs", table, ttl_s=10, write_time_ms=99)
    prepared, schemas = codec.encode("fs", rows_of(table), 10, 99)
    assert batch.schemas == schemas
    assert batch.entity_keys == [p.entity_key for p in prepared]
    for row, record in zip(prepared, batch.records, strict=True):
        # The header but its last word, where the values end: the encoders may pick other integer forms.
        assert record[: HEADER.size - 8] == row.record[: HEADER.size - 8]
        assert HEADER.unpack_from(record)[-1] == len(record)  # no tiles: the values run to the end
        mine, theirs = msgpack.unpackb(record[HEADER.size :]), msgpack.unpackb(row.record[HEADER.size :])
        assert len(mine) == len(theirs) and all(map(_same, mine, theirs)), (mine, theirs)


def test_round_trip_equals_put_batch(store: OnlineStore, put_columns: PutColumns, fs: str) -> None:
    table = _table()
    assert put_columns(fs, table, write_time_ms=T0 + 9) == table.num_rows
    assert store.put_batch(fs + "_rows", rows_of(table), write_time_ms=T0 + 9) == table.num_rows
    keys = table.column("entity_key").to_pylist()
    features = [c for c in table.column_names if c not in ("entity_key", "event_time")]
    mine = store.get_batch(fs, keys, features, now_ms=T0 + 100)
    theirs = store.get_batch(fs + "_rows", keys, features, now_ms=T0 + 100)
    for a, b in zip(mine, theirs, strict=True):
        assert (a.event_time_ms, a.write_time_ms, a.age_ms) == (b.event_time_ms, b.write_time_ms, b.age_ms)
        assert all(_same(a.values[f], b.values[f]) for f in features), (a.values, b.values)
    assert mine[0].values["strings"] == "" and mine[2].values["ints"] == 127


def test_newer_wins_and_the_newest_per_entity_in_a_batch(
    store: OnlineStore, put_columns: PutColumns, fs: str
) -> None:
    store.put_batch(fs, [("u", T0 + 100, {"v": "stream t100"}), ("w", T0 + 100, {"v": "stream w"})])
    table = pa.table(
        {
            "entity_key": ["u", "w", "n", "n", "n", "m"],
            "event_time": [T0 + 50, T0 + 100, T0 + 300, T0 + 200, T0 + 300, T0],
            "v": ["late", "tie: last write wins", "X", "Y", "Z", "new"],
        }
    )
    assert put_columns(fs, table) == 3  # u is older than what is stored
    rows = store.get_batch(fs, ["u", "w", "n", "m"], ["v"], now_ms=T0)
    assert [r.values["v"] for r in rows] == ["stream t100", "tie: last write wins", "Z", "new"]
    assert [r.event_time_ms for r in rows] == [T0 + 100, T0 + 100, T0 + 300, T0]
    assert put_columns(fs, table) == 3  # again: u is still older, the others are ties


def test_ttl_by_event_time_and_timestamp_event_times(
    store: OnlineStore, put_columns: PutColumns, fs: str
) -> None:
    base = epoch_ms() - 1_000  # near the wall clock: Redis and Aerospike also expire physically
    table = pa.table(
        {
            "entity_key": ["a", "b"],
            "event_time": pa.array([base, base + 1_000], pa.timestamp("ms", tz="UTC")),
            "v": [1, 2],
        }
    )
    put_columns(fs, table, ttl_s=3_600, write_time_ms=5)
    found = [r.found for r in store.get_batch(fs, ["a", "b"], ["v"], now_ms=base + 3_600_000)]
    assert found == [False, True]
    row = store.get_batch(fs, ["b"], ["v"], now_ms=base + 1_000)[0]
    assert (row.values, row.event_time_ms, row.write_time_ms) == ({"v": 2}, base + 1_000, 5)


def test_column_names_are_configurable_and_features_may_be_none(
    store: OnlineStore, put_columns: PutColumns, fs: str
) -> None:
    table = pa.table({"user": ["u1"], "t": [T0]})
    assert put_columns(fs, table, entity_column="user", time_column="t") == 1
    assert store.get_batch(fs, ["u1"], ["x"], now_ms=T0)[0].values == {"x": None}
    assert (
        put_columns(
            fs, pa.table({"entity_key": pa.array([], pa.string()), "event_time": pa.array([], pa.int64())})
        )
        == 0
    )


def test_rejects_what_it_cannot_store(store: OnlineStore, put_columns: PutColumns, fs: str) -> None:
    good = {"entity_key": ["u"], "event_time": [T0], "a": [1]}
    bad: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("no entity column", {"event_time": [T0], "a": [1]}, {}),
        ("no event time column", {"entity_key": ["u"], "a": [1]}, {}),
        ("an integer entity key", {**good, "entity_key": [7]}, {}),
        ("an empty entity key", {**good, "entity_key": [""]}, {}),
        ("a null entity key", {**good, "entity_key": pa.array([None], pa.string())}, {}),
        ("a float event time", {**good, "event_time": [1.5]}, {}),
        ("a null event time", {**good, "event_time": pa.array([None], pa.int64())}, {}),
        ("a negative event time", {**good, "event_time": [-1]}, {}),
        ("a list value", {**good, "a": [[1, 2]]}, {}),
        ("a zero TTL", good, {"ttl_s": 0}),
    ]
    for what, columns, kwargs in bad:
        with pytest.raises(OnlineStoreError):
            put_columns(fs, pa.table(columns), **kwargs)
            pytest.fail(f"accepted {what}")
    with pytest.raises(OnlineStoreError, match="invalid feature set name"):
        put_columns("no:colons", pa.table(good))
    assert not store.get_batch(fs, ["u"], ["a"])[0].found  # nothing was half-written


# --- several processes ------------------------------------------------------------------

WRITERS = 3
ROUNDS = 30
KEYS = [f"user-{i}" for i in range(200)]


def _columns_writer(settings: Settings, fs: str, writer: int, start: Any) -> None:
    """Bulk writes of every key with interleaved event times, some of them old replays."""
    rng = random.Random(writer)
    with open_online_store(settings) as store:
        start.wait(PROCESS_TIMEOUT_S)
        for r in range(ROUNDS):
            t = T0 + r * WRITERS + writer if r % 4 else T0 + writer  # every 4th round: a stale replay
            keys = rng.sample(KEYS, len(KEYS))
            store.put_columns(
                fs, pa.table({"entity_key": keys, "event_time": [t] * len(keys), "t": [t] * len(keys)})
            )


def test_newer_wins_under_concurrent_bulk_writers(
    store: OnlineStore, store_settings: Settings, fs: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WRITERS + 1)
    procs = [ctx.Process(target=_columns_writer, args=(store_settings, fs, w, start)) for w in range(WRITERS)]
    for proc in procs:
        proc.start()
    try:
        start.wait(PROCESS_TIMEOUT_S)
    finally:
        for proc in procs:
            proc.join(PROCESS_TIMEOUT_S)
    assert [proc.exitcode for proc in procs] == [0] * WRITERS
    newest = T0 + (ROUNDS - 1) * WRITERS + (WRITERS - 1)
    rows = store.get_batch(fs, KEYS, ["t"], now_ms=newest)
    assert {(r.event_time_ms, r.values["t"]) for r in rows} == {(newest, newest)}
