"""The online-store contract, written once and run against every reachable backend.

Each test gets ``store`` (an open store of one backend: see conftest.py) and ``fs``, a feature
set name of its own. Multi-process tests use the ``spawn`` start method, so every child opens
the store from scratch as a separate serving or writer process would.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import random
import time
from typing import Any

import numpy as np
import pytest

from features import Aggregator, ApproxDistinct, Count, Eq, FeatureSet, Max, Mean, Min, Ratio, Sum
from headwater.errors import ConfigError, HeadwaterError
from headwater.settings import Settings, load_settings
from serving.online_store import FeatureRow, OnlineStore, OnlineStoreError, open_online_store
from serving.online_store.base import epoch_ms
from tests.features.oracle import values_at

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
PROCESS_TIMEOUT_S = 60.0

VALUES: dict[str, Any] = {
    "clicks_1h": 3,
    "ctr_24h": 0.125,
    "is_new": True,
    "was_bot": False,
    "last_item": "item-42 ✓",
    "empty": "",
    "missing_window": None,
    "big": 2**62,
    "most_negative": -(2**63),
    "negative_float": -1.5e-300,
}


def _only(rows: list[FeatureRow]) -> FeatureRow:
    assert len(rows) == 1
    return rows[0]


def test_round_trip_keeps_types_and_times(store: OnlineStore, fs: str) -> None:
    written = store.put_batch(
        fs, [("u1", T0, VALUES), ("u2", T0 + 5, {"clicks_1h": 7})], write_time_ms=T0 + 9
    )
    assert written == 2

    row = _only(store.get_batch(fs, ["u1"], list(VALUES), now_ms=T0 + 1_000))
    assert row.found
    assert row.values == VALUES
    assert [type(v) for v in row.values.values()] == [type(v) for v in VALUES.values()]
    assert (row.event_time_ms, row.write_time_ms, row.age_ms) == (T0, T0 + 9, 1_000)

    # Default write time is the wall clock at the write.
    before = epoch_ms()
    store.put_batch(fs, [("u3", T0, {"clicks_1h": 1})])
    after = epoch_ms()
    written_at = _only(store.get_batch(fs, ["u3"], ["clicks_1h"])).write_time_ms
    assert written_at is not None
    assert before <= written_at <= after


def test_features_in_any_order_subset_and_schema(store: OnlineStore, fs: str) -> None:
    store.put_batch(fs, [("a", T0, {"x": 1, "y": 2})])
    store.put_batch(fs, [("b", T0, {"z": 30, "y": 20, "x": 10})])  # another feature list and order

    rows = store.get_batch(fs, ["a", "b"], ["z", "x"], now_ms=T0)
    assert [r.values for r in rows] == [{"z": None, "x": 1}, {"z": 30, "x": 10}]
    assert [r.values for r in store.get_batch(fs, ["b", "a"], ["y"], now_ms=T0)] == [{"y": 20}, {"y": 2}]
    assert [r.values for r in store.get_batch(fs, ["a"], [], now_ms=T0)] == [{}]
    assert store.get_batch(fs, [], ["x"], now_ms=T0) == []


def test_missing_entities_features_and_feature_sets(store: OnlineStore, fs: str) -> None:
    store.put_batch(fs, [("u1", T0, {"a": 1})])

    rows = store.get_batch(fs, ["nobody", "u1", "nobody-else"], ["a", "unknown"], now_ms=T0 + 1)
    assert [r.found for r in rows] == [False, True, False]
    assert rows[0] == FeatureRow({"a": None, "unknown": None}, None, None, None)
    assert rows[1].values == {"a": 1, "unknown": None}
    # Feature sets are separate key spaces.
    assert not _only(store.get_batch(fs + "_other", ["u1"], ["a"], now_ms=T0 + 1)).found


def test_get_values_reads_what_get_batch_reads(store: OnlineStore, fs: str) -> None:
    base = epoch_ms()
    store.put_batch(fs, [("all", base - 5, VALUES), ("other", base - 7, {"big": 1, "clicks_1h": 2})])
    store.put_batch(fs, [("expired", base - 2_000, {"clicks_1h": 9})], ttl_s=1)
    keys = ["all", "nobody", "other", "expired", "all"]
    requests = [
        list(VALUES),  # the stored order: the backend may hand out its decoded array
        ["big", "clicks_1h"],  # another order, a subset
        ["clicks_1h", "unknown"],  # a feature no record has
        ["ctr_24h"],
        [],
    ]
    for features in requests:
        rows = store.get_batch(fs, keys, features, now_ms=base)
        expected = ([tuple(r.values[f] for f in features) for r in rows], [r.event_time_ms for r in rows])
        got = store.get_values(fs, keys, features, now_ms=base)
        assert ([tuple(v) for v in got.values], got.event_time_ms) == expected, features
        # The interface's default (built on get_batch) agrees with the backend's own.
        default = OnlineStore.get_values(store, fs, keys, features, now_ms=base)
        assert ([tuple(v) for v in default.values], default.event_time_ms) == expected, features
    values = store.get_values(fs, ["all"], list(VALUES), now_ms=base).values[0]
    assert [type(v) for v in values] == [type(v) for v in VALUES.values()]
    empty = store.get_values(fs, [], ["big"], now_ms=base)
    assert (empty.values, empty.event_time_ms) == ([], [])


def test_get_values_matrix_is_the_values_as_numbers_and_never_stale(store: OnlineStore, fs: str) -> None:
    """A backend may add the values as float64 (NaN where missing) when all are numbers; a
    record read again may come from its decoded rows, but never after it changed."""
    base = epoch_ms()
    numbers = ["clicks_1h", "ctr_24h", "is_new", "missing_window", "big"]
    store.put_batch(fs, [("a", base - 9, VALUES), ("b", base - 8, {"clicks_1h": 2, "ctr_24h": 0.5})])
    keys = ["a", "nobody", "b", "a", "b"] * 2  # enough records for a backend's decoded rows
    for _ in range(2):  # the second read is of records this process decoded already
        got = store.get_values(fs, keys, numbers, now_ms=base, matrix=True)
        assert got.values == store.get_values(fs, keys, numbers, now_ms=base).values
        assert got.matrix is not None and got.matrix.shape == (len(keys), len(numbers))
        assert np.array_equal(got.matrix, np.array(got.values, dtype=np.float64), equal_nan=True)
        default = OnlineStore.get_values(store, fs, keys, numbers, now_ms=base, matrix=True).matrix
        assert default is not None and np.array_equal(default, got.matrix, equal_nan=True)
    assert store.get_values(fs, keys, numbers, now_ms=base).matrix is None  # only when asked
    text = store.get_values(fs, keys, ["clicks_1h", "last_item"], now_ms=base, matrix=True)
    assert text.matrix is None and text.values[0] == (3, "item-42 ✓")
    pair = ["clicks_1h", "ctr_24h"]
    before = store.get_values(fs, ["b", "a"] * 5, pair, now_ms=base, matrix=True)  # b decoded once
    assert before.matrix is not None and before.matrix.tolist()[:2] == [[2.0, 0.5], [3.0, 0.125]]
    store.put_batch(fs, [("b", base - 1, {"clicks_1h": 3, "ctr_24h": 0.75})])  # b changes
    for keys in (["b", "a"], ["b", "a"] * 5):  # a read of a few records, and a larger one
        got = store.get_values(fs, keys, pair, now_ms=base, matrix=True)
        assert [tuple(v) for v in got.values[:2]] == [(3, 0.75), (3, 0.125)]
        assert got.matrix is not None and got.matrix.tolist()[:2] == [[3.0, 0.75], [3.0, 0.125]]


def test_newer_wins_over_out_of_order_and_duplicated_updates(store: OnlineStore, fs: str) -> None:
    assert store.put_batch(fs, [("u", T0 + 100, {"v": "t100"})], write_time_ms=1) == 1
    assert store.put_batch(fs, [("u", T0 + 50, {"v": "late t50"})], write_time_ms=2) == 0  # late event
    # Equal event time: the later write replaces (the last update emitted at a time holds all
    # its events); a replay of the same update rewrites identical values.
    assert store.put_batch(fs, [("u", T0 + 100, {"v": "t100 both"})], write_time_ms=3) == 1
    row = _only(store.get_batch(fs, ["u"], ["v"], now_ms=T0 + 100))
    assert (row.values, row.event_time_ms, row.write_time_ms) == ({"v": "t100 both"}, T0 + 100, 3)

    assert store.put_batch(fs, [("u", T0 + 150, {"v": "t150"})]) == 1
    assert _only(store.get_batch(fs, ["u"], ["v"], now_ms=T0)).values == {"v": "t150"}

    # Inside one batch too: the newest update per entity wins, the last of equal ones.
    batch = [("w", T0 + 300, {"v": "X"}), ("w", T0 + 200, {"v": "Y"}), ("w", T0 + 300, {"v": "Z"})]
    assert store.put_batch(fs, batch) == 1
    assert store.put_batch(fs, batch) == 1  # the whole batch again: same final value
    assert _only(store.get_batch(fs, ["w"], ["v"], now_ms=T0)).values == {"v": "Z"}

    # A backfill over many entities only fills what is older or absent.
    backfill = [("u", T0 + 120, {"v": "old"}), ("w", T0 + 400, {"v": "newer"}), ("n", T0, {"v": "new"})]
    assert store.put_batch(fs, backfill) == 2
    rows = store.get_batch(fs, ["u", "w", "n"], ["v"], now_ms=T0)
    assert [r.values["v"] for r in rows] == ["t150", "newer", "new"]


def test_ttl_expires_by_event_time(store: OnlineStore, fs: str) -> None:
    # Event times near the wall clock: Redis and Aerospike also expire records physically.
    base = epoch_ms()
    store.put_batch(fs, [("short", base - 1_000, {"v": 1})], ttl_s=3_600)
    store.put_batch(fs, [("forever", base - 1_000, {"v": 2})])
    expires_at = base - 1_000 + 3_600_000

    def found(now: int) -> list[bool]:
        return [r.found for r in store.get_batch(fs, ["short", "forever"], ["v"], now_ms=now)]

    row = store.get_batch(fs, ["short"], ["v"], now_ms=base)[0]
    assert (row.values, row.age_ms) == ({"v": 1}, 1_000)
    assert found(expires_at - 1) == [True, True]
    assert found(expires_at) == [False, True]
    assert found(base + 10 * 365 * 86_400_000) == [False, True]

    # A newer update brings the entity back with a fresh TTL.
    store.put_batch(fs, [("short", base, {"v": 3})], ttl_s=3_600)
    assert _only(store.get_batch(fs, ["short"], ["v"], now_ms=expires_at)).values == {"v": 3}


def test_another_store_instance_sees_the_data(store: OnlineStore, store_settings: Settings, fs: str) -> None:
    store.put_batch(fs, [("u", T0, {"a": 1})])
    with open_online_store(store_settings) as second:
        assert _only(second.get_batch(fs, ["u"], ["a"], now_ms=T0)).values == {"a": 1}
        second.put_batch(fs, [("u", T0 + 1, {"a": 2})])
    # Closing the second instance leaves the first usable (LMDB shares one handle per process).
    assert _only(store.get_batch(fs, ["u"], ["a"], now_ms=T0)).values == {"a": 2}


def test_rejects_what_it_cannot_store(store: OnlineStore, fs: str) -> None:
    bad: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("a list value", [("u", T0, {"a": [1, 2]})], {}),
        ("a float event time", [("u", 1.5, {"a": 1})], {}),
        ("a negative event time", [("u", -1, {"a": 1})], {}),
        ("an empty entity key", [("", T0, {"a": 1})], {}),
        ("a non-string feature name", [("u", T0, {1: 1})], {}),
        ("an int above 64 bits", [("u", T0, {"a": 2**64})], {}),
        ("a zero TTL", [("u", T0, {"a": 1})], {"ttl_s": 0}),
    ]
    for what, rows, kwargs in bad:
        with pytest.raises(OnlineStoreError):
            store.put_batch(fs, rows, **kwargs)
            pytest.fail(f"accepted {what}")
    with pytest.raises(OnlineStoreError, match="invalid feature set name"):
        store.get_batch("no:colons", ["u"], ["a"])
    assert not _only(store.get_batch(fs, ["u"], ["a"])).found  # nothing was half-written


# --- several processes ------------------------------------------------------------------

WRITERS = 4
ROUNDS = 60
KEYS = [f"user-{i}" for i in range(16)]


def _values(key: str, event_time: int) -> dict[str, Any]:
    return {"t": event_time, "s": f"{key}@{event_time}", "half": event_time / 2, "even": event_time % 2 == 0}


def _writer(settings: Settings, fs: str, writer: int, start: Any) -> None:
    """Writes event times interleaved with the other writers', late and replayed ones included.

    Rounds go roughly forward (shuffled within windows of 6) so that every writer keeps
    contending for the newest value of every key until the end.
    """
    rng = random.Random(writer)
    rounds = list(range(ROUNDS))
    order = [r for w in range(0, ROUNDS, 6) for r in rng.sample(rounds[w : w + 6], len(rounds[w : w + 6]))]
    with open_online_store(settings) as store:
        start.wait(PROCESS_TIMEOUT_S)
        for r in order:
            keys = KEYS[:]
            rng.shuffle(keys)
            event_time = T0 + r * WRITERS + writer
            store.put_batch(fs, [(key, event_time, _values(key, event_time)) for key in keys])
            if r % 5 == 0:  # a replay of an old update
                store.put_batch(fs, [(keys[0], T0 + writer, _values(keys[0], T0 + writer))])


def test_newer_wins_under_concurrent_writer_processes(
    store: OnlineStore, store_settings: Settings, fs: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WRITERS + 1)
    procs = [ctx.Process(target=_writer, args=(store_settings, fs, w, start)) for w in range(WRITERS)]
    for proc in procs:
        proc.start()
    try:
        start.wait(PROCESS_TIMEOUT_S)
        # While they write, the stored event time of a key must never go back: an older
        # update overwriting a newer one, even for a moment, is a lost compare-and-set.
        seen = dict.fromkeys(KEYS, -1)
        regressions = []
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while any(proc.is_alive() for proc in procs) and time.monotonic() < deadline:
            for key, row in zip(KEYS, store.get_batch(fs, KEYS, ["t"]), strict=True):
                if row.event_time_ms is not None:
                    if row.event_time_ms < seen[key]:
                        regressions.append((key, seen[key], row.event_time_ms))
                    seen[key] = max(seen[key], row.event_time_ms)
    finally:
        for proc in procs:
            proc.join(PROCESS_TIMEOUT_S)
    assert [proc.exitcode for proc in procs] == [0] * WRITERS
    assert regressions == []

    newest = T0 + (ROUNDS - 1) * WRITERS + (WRITERS - 1)
    rows = store.get_batch(fs, KEYS, ["t", "s", "half", "even"], now_ms=newest)
    for key, row in zip(KEYS, rows, strict=True):
        assert (row.event_time_ms, row.values) == (newest, _values(key, newest)), key


def _reader(settings: Settings, fs: str, opened: Any, written: Any, results: Any) -> None:
    with open_online_store(settings) as store:
        results.put(store.get_batch(fs, ["u1", "u2"], ["a"], now_ms=T0)[0].found)
        opened.set()
        if not written.wait(PROCESS_TIMEOUT_S):
            raise TimeoutError("the parent never wrote")
        results.put([r.values for r in store.get_batch(fs, ["u1", "u2"], ["a"], now_ms=T0)])


def test_reader_process_sees_writes_committed_after_it_opened(
    store: OnlineStore, store_settings: Settings, fs: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    opened, written, results = ctx.Event(), ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(store_settings, fs, opened, written, results))
    reader.start()
    try:
        assert opened.wait(PROCESS_TIMEOUT_S), "the reader process did not open the store"
        assert results.get(timeout=PROCESS_TIMEOUT_S) is False
        store.put_batch(fs, [("u1", T0, {"a": 1}), ("u2", T0, {"a": 2})])
        written.set()
        assert results.get(timeout=PROCESS_TIMEOUT_S) == [{"a": 1}, {"a": 2}]
    finally:
        reader.join(PROCESS_TIMEOUT_S)
    assert reader.exitcode == 0


# --- backend selection --------------------------------------------------------------------


def test_aerospike_needs_hosts(tmp_path: Any) -> None:
    settings = load_settings(data_dir=tmp_path, online_store={"type": "aerospike"})
    with pytest.raises(ConfigError, match="aerospike_hosts"):
        open_online_store(settings)


def test_aerospike_without_its_client_says_what_to_install(tmp_path: Any) -> None:
    # Port 9 on loopback: nothing listens, so with a client installed this fails fast too.
    settings = load_settings(
        data_dir=tmp_path, online_store={"type": "aerospike", "aerospike_hosts": "127.0.0.1:9"}
    )
    if importlib.util.find_spec("aerospike") is None:
        with pytest.raises(ConfigError, match="pip install aerospike"):
            open_online_store(settings)
    else:
        with pytest.raises(HeadwaterError, match="cannot connect"):
            open_online_store(settings)


# --- windows read at the read's time ---------------------------------------------------------

_NUMERIC = FeatureSet(
    "contract_windows",
    entity="user_id",
    source="clicks",
    owner="test",
    description="numeric windows for the read-time contract",
    features=[
        Count(windows=["5m", "1h"], name="n"),
        Sum("position", windows=["5m"], name="pos"),
        Mean("propensity", windows=["1h"], name="mean_prop"),
        Min("position", windows=["1h"], name="min_pos"),
        Max("position", windows=["5m"], name="max_pos"),
        ApproxDistinct("item_id", windows=["1h"], name="items"),
        Ratio(Count(where=Eq("action", "CLICK")), Count(), windows=["1h"], name="ctr"),
    ],
)


def _windowed_updates(users: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Each user's events (a few, spread over an hour) and the last update the engine emitted."""
    rng = random.Random(11)
    agg = Aggregator(_NUMERIC)
    events: dict[str, list[dict[str, Any]]] = {}
    last: dict[str, dict[str, Any]] = {}
    for i in range(users * 6):
        user = f"u{i % users}"
        t = T0 + i * 9_000 + rng.randint(0, 5_000)
        event = {
            "event_id": f"e{i}", "event_time": t, "user_id": user, "item_id": f"i{rng.randint(1, 5)}",
            "action": rng.choice(["IMPRESSION", "CLICK"]), "position": rng.randint(1, 3),
            "propensity": rng.choice([0.1, 0.25]),
        }  # fmt: skip
        events.setdefault(user, []).append(event)
        last[user] = agg.apply(event, write_time=t)[-1]
    return events, last


def _expected_at(events: list[dict[str, Any]], t: int, names: list[str]) -> list[Any]:
    values = values_at(_NUMERIC, events, t)
    return [values[name] for name in names]


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return bool(a == b)


@pytest.mark.parametrize("how", ["rows", "columns"])
def test_windows_are_evaluated_at_the_read_time(store: OnlineStore, fs: str, how: str) -> None:
    import pyarrow as pa

    events, last = _windowed_updates(users=12)
    users = sorted(last)
    if how == "rows":
        rows = [
            (u, last[u]["event_time"], last[u]["values"], last[u]["valid_until"], last[u]["tiles"])
            for u in users
        ]
        store.put_batch(fs, rows)
    else:
        names = _NUMERIC.feature_names
        table = pa.table(
            {
                "entity_key": users,
                "event_time": [last[u]["event_time"] for u in users],
                **{n: [last[u]["values"][n] for u in users] for n in names},
                "_valid_until": [last[u]["valid_until"] for u in users],
                "_tiles": pa.array([last[u]["tiles"] for u in users], pa.binary()),
            }
        )
        store.put_columns(fs, table)
    names = _NUMERIC.feature_names
    newest = max(u["event_time"] for u in last.values())
    soonest = min(u["valid_until"] for u in last.values())
    # Before any tile leaves, at it, between, long after (every window empty), each read twice
    # (the second from what the first evaluated and decoded), and once back in time: the cached
    # decoded rows (a batch of 12 records) must never serve a value that a tile's leaving changed.
    times = [newest, soonest - 1, soonest, newest + 10 * 60_000, newest + 45 * 60_000]
    for now in [*(t for t in times for _ in range(2)), newest + 6 * 86_400_000, newest + 10 * 60_000]:
        got = store.get_values(fs, users, names, now_ms=now, matrix=True)
        dicts = store.get_batch(fs, users, names, now_ms=now)
        for i, user in enumerate(users):
            t = last[user]["event_time"]  # a read before it reads the record as of then
            want = _expected_at([e for e in events[user] if e["event_time"] <= t], max(now, t), names)
            assert all(map(_close, got.values[i], want)), (user, now, got.values[i], want)
            assert all(map(_close, [dicts[i].values[n] for n in names], want)), (user, now)
            assert got.matrix is not None
            numbers = [np.nan if v is None else float(v) for v in want]
            assert np.allclose(got.matrix[i], numbers, equal_nan=True, rtol=1e-12), (user, now)
            assert got.event_time_ms[i] == last[user]["event_time"]
    inactive = store.get_batch(fs, users[:1], ["n_1h", "n_5m", "ctr_1h"], now_ms=newest + 6 * 86_400_000)[0]
    assert inactive.values == {"n_1h": 0, "n_5m": 0, "ctr_1h": None}  # six days on: empty windows, not stale
