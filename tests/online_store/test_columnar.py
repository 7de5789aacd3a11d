"""The vectorised encoder (``encode_columns``) against the row codec, on every path it takes.

The encoder writes cells at computed byte offsets into one buffer, so a wrong offset shows up
as a record that decodes to other values, or not at all. Each test encodes a table both ways
-- ``encode_columns`` and ``RecordCodec.encode`` over ``rows_of`` the same table -- and wants
the same entities, in key order, with the same headers and the same decoded values and types.
Paths: keys already sorted, a permutation (records laid out by key), duplicates (older updates
dropped), several chunks, fixed-width rows only, nulls over wider values, long strings, string
slots of nulls that hold bytes, sliced and chunked columns.
"""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa
import pytest

from serving.online_store import cells, columnar
from serving.online_store.codec import HEADER, RecordCodec
from serving.online_store.columnar import encode_columns, rows_of

T0 = 1_700_000_000_000
INTS = [0, 1, 31, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**63 - 1]
NEGATIVE = [-1, -32, -33, -128, -129, -32_768, -32_769, -(2**31), -(2**31) - 1, -(2**63)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def assert_encodes_like_rows(table: pa.Table, **kwargs: Any) -> columnar.ColumnBatch:
    codec = RecordCodec()
    batch = encode_columns(codec, "fs", table, ttl_s=kwargs.get("ttl_s", 60), write_time_ms=99)
    prepared, schemas = codec.encode("fs", rows_of(table), kwargs.get("ttl_s", 60), 99)
    prepared.sort(key=lambda row: row.entity_key.encode())
    assert batch.schemas == schemas
    assert batch.entity_keys == [row.entity_key for row in prepared]
    assert batch.event_times.tolist() == [row.event_time_ms for row in prepared]
    assert batch.expires_at.tolist() == [row.expires_at_ms for row in prepared]
    assert len(batch.records) == len(prepared)
    for row, record in zip(prepared, batch.records, strict=True):
        assert type(record) is bytes
        # The header but its last word, where the values end: the encoders may pick other integer forms.
        assert record[: HEADER.size - 8] == row.record[: HEADER.size - 8], row.entity_key
        assert HEADER.unpack_from(record)[-1] == len(record)  # no tiles: the values run to the end
        mine, theirs = msgpack.unpackb(record[HEADER.size :]), msgpack.unpackb(row.record[HEADER.size :])
        assert len(mine) == len(theirs) and all(map(_same, mine, theirs)), (row.entity_key, mine, theirs)
    return batch


def _random_table(rng: random.Random, n: int, keys: list[str]) -> pa.Table:
    """Every column type with nulls at random, including msgpack's size boundaries."""

    def maybe(values: list[Any], nulls: float) -> list[Any]:
        return [None if rng.random() < nulls else v for v in values]

    strings = ["", "a", "x" * 31, "x" * 32, "é" * 200, "y" * 255, "y" * 256, "✓", "z" * 600]
    return pa.table(
        {
            "entity_key": keys,
            "event_time": [T0 + rng.randrange(5) for _ in range(n)],
            "dense": [rng.random() for _ in range(n)],
            "floats": maybe([rng.choice([0.1, -0.0, math.inf, math.nan, 1e300]) for _ in range(n)], 0.3),
            "ints": maybe([rng.choice(INTS + NEGATIVE) for _ in range(n)], 0.2),
            "small": maybe([rng.randrange(-32, 128) for _ in range(n)], 0.5),
            "unsigned": pa.array(maybe([rng.choice(INTS) for _ in range(n)], 0.1), pa.uint64()),
            "int16": pa.array(maybe([rng.randrange(-300, 300) for _ in range(n)], 0.4), pa.int16()),
            "flags": maybe([rng.random() < 0.5 for _ in range(n)], 0.3),
            "strings": maybe([rng.choice(strings) for _ in range(n)], 0.3),
            "category": pa.array(maybe([rng.choice("abc") for _ in range(n)], 0.2)).dictionary_encode(),
            "nothing": pa.nulls(n, pa.float64()),
            "dense_int": [rng.randrange(1000) for _ in range(n)],
        }
    )


@pytest.mark.parametrize("order", ["sorted", "shuffled", "duplicates"])
def test_random_tables_encode_like_rows(order: str) -> None:
    rng = random.Random(order)
    for n in (1, 2, 7, 300):
        keys = [f"k{i:04d}" for i in range(n)]
        if order == "shuffled":
            rng.shuffle(keys)
        elif order == "duplicates":
            keys = [rng.choice(keys) for _ in range(n)]
        assert_encodes_like_rows(_random_table(rng, n, keys))


def test_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columnar, "CHUNK_BYTES", 2_000)  # a few rows per chunk
    rng = random.Random(3)
    keys = [f"k{i:04d}" for i in range(200)]
    rng.shuffle(keys)
    assert_encodes_like_rows(_random_table(rng, 200, keys))  # a permutation over chunks: sorted first
    assert_encodes_like_rows(_random_table(rng, 200, sorted(keys)))
    assert_encodes_like_rows(_random_table(rng, 200, [rng.choice(keys) for _ in range(200)]))


def test_rows_of_fixed_width_only() -> None:
    """No nulls, no strings: one matrix is every record; shuffled keys reorder its rows."""
    n = 50
    keys = [f"u{i:03d}" for i in range(n)][::-1]
    table = pa.table(
        {
            "entity_key": keys,
            "event_time": [T0 + i for i in range(n)],
            "x": [i / 3 for i in range(n)],
            "n": [i * 1000 for i in range(n)],
            "flag": [i % 2 == 0 for i in range(n)],
            "nothing": pa.nulls(n),
        }
    )
    batch = assert_encodes_like_rows(table)
    assert len({len(record) for record in batch.records}) == 1
    assert_encodes_like_rows(table.select(["entity_key", "event_time"]))  # no features at all


def test_long_strings_and_string_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cells, "STRING_GROUP_BYTES", 64)  # short strings in many groups
    rng = random.Random(5)
    lengths = [0, 1, 31, 32, 100, 511, 512, 513, 65_535, 65_536, 70_000]
    n = 120
    values = [None if i % 9 == 0 else chr(97 + i % 26) * rng.choice(lengths) for i in range(n)]
    keys = [f"k{i:03d}" for i in range(n)]
    rng.shuffle(keys)
    table = pa.table(
        {"entity_key": keys, "event_time": [T0] * n, "s": values, "t": pa.array(values, pa.large_string())}
    )
    assert_encodes_like_rows(table)


def test_null_string_slots_holding_bytes_write_nil_only() -> None:
    """Arrow lets a null slot span bytes; they must not reach the record."""
    data = b"aaaHIDDENbb"
    offsets = np.array([0, 3, 9, 11], np.int32)  # the second slot is null but spans "HIDDEN"
    validity = np.packbits(np.array([1, 0, 1, 0, 0, 0, 0, 0], np.uint8), bitorder="little")
    strings = pa.StringArray.from_buffers(
        3, pa.py_buffer(offsets), pa.py_buffer(data), pa.py_buffer(validity)
    )
    assert strings.to_pylist() == ["aaa", None, "bb"]
    table = pa.table(
        {"entity_key": ["c", "a", "b"], "event_time": [T0, T0, T0], "s": strings, "x": [1.5, None, 2.5]}
    )
    batch = assert_encodes_like_rows(table)
    assert all(b"HIDDEN" not in record for record in batch.records)


def test_sliced_and_chunked_columns() -> None:
    rng = random.Random(11)
    keys = [f"k{i:03d}" for i in range(120)]
    rng.shuffle(keys)
    table = _random_table(rng, 120, keys)
    assert_encodes_like_rows(table.slice(17, 60))  # every column starts at an offset
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=13))
    assert chunked.column("strings").num_chunks > 1
    assert_encodes_like_rows(chunked)


def test_newest_update_per_entity_last_of_equal_times() -> None:
    table = pa.table(
        {
            "entity_key": ["b", "a", "b", "a", "a", "c"],
            "event_time": [T0 + 5, T0 + 1, T0 + 5, T0 + 3, T0 + 2, T0],
            "v": ["b first", "a old", "b last", "a newest", "a middle", "c"],
        }
    )
    batch = assert_encodes_like_rows(table)
    assert batch.entity_keys == ["a", "b", "c"]
    assert [msgpack.unpackb(r[HEADER.size :])[0] for r in batch.records] == ["a newest", "b last", "c"]


def test_store_keys_prefix_the_utf8_keys() -> None:
    table = pa.table({"entity_key": ["é", "b", "a"], "event_time": [T0] * 3})
    batch = encode_columns(RecordCodec(), "fs", table)
    assert batch.store_keys(b"fs\0").to_pylist() == [b"fs\0a", b"fs\0b", "fs\0é".encode()]
