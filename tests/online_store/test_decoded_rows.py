"""The codec's decoded rows: reads of records this process decoded already, with no store."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from serving.online_store.base import Value
from serving.online_store.codec import RecordCodec, _DecodedRows

T0 = 1_700_000_000_000


def records(
    codec: RecordCodec, rows: Mapping[str, Mapping[str, Value]]
) -> tuple[dict[str, bytes], dict[int, bytes]]:
    prepared, schemas = codec.encode("fs", [(k, T0, v) for k, v in rows.items()], None, T0)
    return {r.entity_key: r.record for r in prepared}, schemas


def test_rows_read_again_match_a_fresh_decode_when_full_and_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_DecodedRows, "LIMIT", 5)  # full after a read or two
    monkeypatch.setattr(_DecodedRows, "RENEW_AFTER", 20)  # then renewed: few hits among 42 keys
    codec = RecordCodec()
    rng = np.random.default_rng(0)
    stored: dict[str, dict[str, Value]] = {
        f"e{i}": {"x": float(rng.random()), "n": int(i), "gone": None} for i in range(40)
    }
    by_key, schemas = records(codec, stored)
    tables: list[_DecodedRows] = []  # kept alive: an id() is reused once its object is freed
    for _ in range(12):
        keys = [f"e{i}" for i in rng.integers(0, 42, size=9)]  # e40, e41: not stored
        records_read = [by_key.get(k) for k in keys]
        got = codec.decode_values(records_read, ["n", "x", "gone"], T0, schemas.get, matrix=True)
        want = [(stored[k]["n"], stored[k]["x"], None) if k in stored else (None, None, None) for k in keys]
        assert [tuple(v) for v in got.values] == want
        assert got.matrix is not None
        assert np.array_equal(got.matrix, np.array(want, dtype=np.float64), equal_nan=True)
        table = codec._rows[("n", "x", "gone")]
        tables.append(table)
        assert len(table.values) <= _DecodedRows.LIMIT + len(keys)
        plain = codec.decode_values(records_read, ["n", "x", "gone"], T0, schemas.get)
        assert plain.values == got.values and plain.matrix is None  # no matrix unless asked
    assert len({id(t) for t in tables}) > 1  # renewed at least once


def test_a_feature_list_with_text_has_no_matrix_but_its_values() -> None:
    codec = RecordCodec()
    by_key, schemas = records(codec, {"a": {"n": 1, "s": "x"}, "b": {"n": 2, "s": "y"}})
    for _ in range(2):
        got = codec.decode_values([by_key["a"], by_key["b"]], ["n", "s"], T0, schemas.get, matrix=True)
        assert got.matrix is None and [tuple(v) for v in got.values] == [(1, "x"), (2, "y")]
    only_numbers = codec.decode_values([by_key["b"]], ["n"], T0, schemas.get, matrix=True).matrix
    assert only_numbers is not None and only_numbers.tolist() == [[2.0]]
