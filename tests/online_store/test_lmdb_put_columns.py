"""LMDB's bulk write paths: where the store holds nothing of the feature set, ``put_columns``
skips the newer-wins lookups, and appends (MDB_APPEND) when no stored key follows the batch's.

Each path must leave the store as ``put_batch`` would: every record readable, the other feature
sets untouched, newer values kept where there are some.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from serving.online_store import columnar
from serving.online_store import lmdb as lmdb_store
from serving.online_store.lmdb import LmdbOnlineStore, _put_sorted

T0 = 1_700_000_000_000
KEYS = [f"user-{i:03d}" for i in (5, 1, 4, 2, 3, 0)]  # not sorted


def _table(t: int, keys: list[str] = KEYS) -> pa.Table:
    return pa.table(
        {
            "entity_key": keys,
            "event_time": [t] * len(keys),
            "v": [f"{key}@{t}" for key in keys],
            "n": [None if i % 2 else i for i in range(len(keys))],
        }
    )


def _values(store: LmdbOnlineStore, fs: str, keys: list[str] = KEYS) -> dict[str, tuple[object, ...]]:
    rows = store.get_batch(fs, keys, ["v", "n"], now_ms=T0)
    return {k: (r.event_time_ms, r.values["v"], r.values["n"]) for k, r in zip(keys, rows, strict=True)}


def _expected(t: int, keys: list[str] = KEYS) -> dict[str, tuple[object, ...]]:
    return {k: (t, f"{k}@{t}", None if i % 2 else i) for i, k in enumerate(keys)}


@pytest.fixture()
def paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """How each put_columns wrote: 'append', 'insert' (nothing stored) or 'newer-wins' (lookups)."""
    taken: list[str] = []
    put_sorted = lmdb_store._put_sorted

    def spy(*args: Any, append: bool) -> int:
        taken.append("append" if append else "insert")
        return put_sorted(*args, append=append)

    monkeypatch.setattr(lmdb_store, "_put_sorted", spy)
    return taken


def test_into_an_empty_store(tmp_path: Path, paths: list[str]) -> None:
    with LmdbOnlineStore(tmp_path / "online", map_size_mb=64) as store:
        assert store.put_columns("fs", _table(T0)) == len(KEYS)
        assert _values(store, "fs") == _expected(T0)
    assert paths == ["append"]


def test_before_and_after_other_feature_sets(tmp_path: Path, paths: list[str]) -> None:
    with LmdbOnlineStore(tmp_path / "online", map_size_mb=64) as store:
        store.put_columns("mm", _table(T0 + 1))
        assert store.put_columns("zz", _table(T0 + 2)) == len(KEYS)  # after every stored key
        assert store.put_columns("aa", _table(T0 + 3)) == len(KEYS)  # before them
        store.put_batch("mm", [("user-999", T0, {"v": "x"})])  # one key of mm sorts after the batch
        assert store.put_columns("mm", _table(T0 + 4, ["user-000", "user-500"])) == 2
        assert paths == ["append", "append", "insert"]  # then newer-wins lookups for mm
        assert _values(store, "zz") == _expected(T0 + 2)
        assert _values(store, "aa") == _expected(T0 + 3)
        assert _values(store, "mm") == {
            **_expected(T0 + 1),
            "user-000": (T0 + 4, "user-000@1700000000004", 0),
        }
        assert _values(store, "mm", ["user-500", "user-999"]) == {
            "user-500": (T0 + 4, "user-500@1700000000004", None),
            "user-999": (T0, "x", None),
        }


def test_newer_stored_values_are_kept(tmp_path: Path) -> None:
    with LmdbOnlineStore(tmp_path / "online", map_size_mb=64) as store:
        store.put_columns("fs", _table(T0 + 10, KEYS[:3]))
        assert store.put_columns("fs", _table(T0 + 5)) == len(KEYS) - 3
        assert _values(store, "fs") == {**_expected(T0 + 5), **_expected(T0 + 10, KEYS[:3])}
        assert store.put_columns("fs", _table(T0 + 10)) == len(KEYS)  # ties: the last write wins


def test_several_slices_each_path(tmp_path: Path, paths: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columnar, "SLICE_ROWS", 4)  # records go 4 at a time, in one transaction
    keys = [f"user-{i:03d}" for i in range(13, -1, -1)]
    with LmdbOnlineStore(tmp_path / "online", map_size_mb=64) as store:
        assert store.put_columns("mm", _table(T0 + 1, keys)) == len(keys)  # appended
        assert store.put_columns("aa", _table(T0 + 2, keys)) == len(keys)  # inserted
        assert paths == ["append"] * 4 + ["insert"] * 4
        newer = keys[::3]  # stored newer than the next batch, in every slice of it
        store.put_columns("mm", _table(T0 + 9, newer))
        assert store.put_columns("mm", _table(T0 + 5, keys)) == len(keys) - len(newer)
        assert _values(store, "aa", keys) == _expected(T0 + 2, keys)
        assert _values(store, "mm", keys) == {**_expected(T0 + 5, keys), **_expected(T0 + 9, newer)}


def test_an_append_lmdb_refuses_is_written_in_place(tmp_path: Path) -> None:
    with LmdbOnlineStore(tmp_path / "online", map_size_mb=64) as store:
        env = store._live_env()
        with env.begin(write=True) as txn:
            txn.put(b"k9", b"stored")
            cursor = txn.cursor()
            assert _put_sorted(cursor, [b"k1", b"k2"], [b"one", b"two"], append=True) == 2
        with env.begin() as txn:
            assert [txn.get(k) for k in (b"k1", b"k2", b"k9")] == [b"one", b"two", b"stored"]
