"""LMDB online store: the embedded default (DESIGN.md §3).

One memory-mapped environment on local disk; the processors' writer process and any number
of serving processes open it at once. LMDB runs one write transaction at a time across all
processes (a mutex in the lock file), so the read-compare-write of newer-wins inside a write
transaction is atomic with no retry loop. Readers never block and are never blocked: each
``get_batch`` opens a fresh read transaction, which sees every write committed before it.
``put_columns`` (backfills) does the same in one transaction for a whole column batch,
encoded vectorised, then a slice of records at a time: one multi-get of the stored records,
one multi-put in key order; into a feature set the store holds nothing of, no lookups, and an
append when its keys come last.

Keys are ``<feature set> NUL <entity key>`` in the one unnamed database, values the shared
record format of :mod:`serving.online_store.codec`; schemas live under ``#schema NUL <id>``
(feature set names cannot start with ``#``).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb

from headwater.integrity import CheckReport
from serving.online_store.base import (
    FeatureRow,
    FeatureValues,
    OnlineStore,
    OnlineStoreError,
    Row,
    check_feature_set,
    epoch_ms,
)
from serving.online_store.codec import RecordCodec, event_time_of

if TYPE_CHECKING:
    import pyarrow as pa

    from serving.online_store.cells import I64

__all__ = ["MAX_READERS", "SCHEMA_PREFIX", "LmdbOnlineStore", "schema_key"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Getter = Callable[[Any], Any]  # a read transaction's get, or the schema lookup

# Reader slots live in the lock file and are fixed by the first process that opens the
# environment; serving replicas with thread pools need more than LMDB's default 126.
MAX_READERS = 1024
MAX_KEY_BYTES = 511  # LMDB's compile-time key limit
SCHEMA_PREFIX = b"#schema\0"

# LMDB must not be opened twice in one process (closing either handle drops the other's
# POSIX locks), and a handle must not cross fork. Hence one shared handle per (pid, path).
_envs: dict[tuple[int, str], tuple[lmdb.Environment, int]] = {}
_envs_lock = threading.Lock()


def _acquire_env(path: Path, map_size: int) -> lmdb.Environment:
    path.mkdir(parents=True, exist_ok=True)
    key = (os.getpid(), str(path.resolve()))
    with _envs_lock:
        if key in _envs:
            env, refs = _envs[key]
            _envs[key] = (env, refs + 1)
            return env
        try:
            env = lmdb.open(
                key[1],
                map_size=map_size,
                max_readers=MAX_READERS,
                max_dbs=0,
                readahead=False,  # random point reads: read-ahead only pollutes the page cache
                meminit=False,
                lock=True,
            )
            # Free the reader slots of processes that died holding a read transaction.
            stale = env.reader_check()
        except lmdb.Error as exc:
            raise OnlineStoreError(f"cannot open the LMDB online store at {path}: {exc}") from exc
        if stale:
            log.info("cleared %d stale LMDB reader slots in %s", stale, path)
        _envs[key] = (env, 1)
        return env


def _release_env(env: lmdb.Environment) -> None:
    with _envs_lock:
        for key, (cached, refs) in list(_envs.items()):
            if cached is env:
                if refs > 1:
                    _envs[key] = (cached, refs - 1)
                else:
                    del _envs[key]
                    env.close()
                return


class LmdbOnlineStore(OnlineStore):
    """Online store in an LMDB environment at ``path`` (created if missing)."""

    backend = "lmdb"

    def __init__(self, path: Path, map_size_mb: int = 4096) -> None:
        self.path = path
        self._map_size_mb = map_size_mb
        self._env: lmdb.Environment | None = _acquire_env(path, map_size_mb * 1024 * 1024)
        self._codec = RecordCodec()
        self._prefixes: dict[str, bytes] = {}

    def _live_env(self) -> lmdb.Environment:
        if self._env is None:
            raise OnlineStoreError(f"the LMDB online store at {self.path} is closed: open a new one")
        return self._env

    def put_batch(
        self,
        feature_set: str,
        rows: Iterable[Row],
        *,
        ttl_s: float | None = None,
        write_time_ms: int | None = None,
    ) -> int:
        env = self._live_env()
        prepared, schemas = self._codec.encode(feature_set, rows, ttl_s, write_time_ms)
        if not prepared:
            return 0
        prefix = feature_set.encode() + b"\0"
        written = 0
        try:
            with env.begin(write=True) as txn:
                for schema_id, names in schemas.items():
                    txn.put(schema_key(schema_id), names, overwrite=False)
                for row in prepared:
                    key = prefix + row.entity_key.encode()
                    if len(key) > MAX_KEY_BYTES:
                        raise OnlineStoreError(
                            f"{feature_set}/{row.entity_key[:40]}...: key is {len(key)} bytes, "
                            f"LMDB allows {MAX_KEY_BYTES}: shorten the entity key"
                        )
                    current = txn.get(key)
                    if current is not None and event_time_of(current) > row.event_time_ms:
                        continue
                    txn.put(key, row.record)
                    written += 1
        except lmdb.MapFullError as exc:
            raise self._full() from exc
        except lmdb.Error as exc:
            raise OnlineStoreError(f"LMDB write to {self.path} failed: {exc}") from exc
        return written

    def put_columns(
        self,
        feature_set: str,
        table: pa.Table,
        *,
        entity_column: str = "entity_key",
        time_column: str = "event_time",
        ttl_s: float | None = None,
        write_time_ms: int | None = None,
    ) -> int:
        env = self._live_env()
        import pyarrow.compute as pc

        from serving.online_store.columnar import encode_columns

        batch = encode_columns(
            self._codec,
            feature_set,
            table,
            entity_column=entity_column,
            time_column=time_column,
            ttl_s=ttl_s,
            write_time_ms=write_time_ms,
        )
        if not len(batch):
            return 0
        prefix = feature_set.encode() + b"\0"
        sizes = pc.binary_length(batch.keys)
        longest = len(prefix) + pc.max(sizes).as_py()
        if longest > MAX_KEY_BYTES:
            entity = batch.keys[pc.index(sizes, longest - len(prefix)).as_py()].as_py()
            raise OnlineStoreError(
                f"{feature_set}/{entity[:40]}...: key is {longest} bytes, "
                f"LMDB allows {MAX_KEY_BYTES}: shorten the entity key"
            )
        key_array = batch.store_keys(prefix)  # sorted, distinct
        written = 0
        try:
            with env.begin(write=True) as txn:
                for schema_id, names in batch.schemas.items():
                    txn.put(schema_key(schema_id), names, overwrite=False)
                cursor = txn.cursor()
                # Newer-wins inside the write transaction, as put_batch. Where the store holds no
                # key of this feature set there is nothing to compare, and when no key follows
                # them either, the sorted keys are appended (MDB_APPEND: no search, full pages).
                # The records go a slice at a time (see columnar.SLICE_ROWS), in this transaction.
                compare = append = False
                if not cursor.set_range(prefix):
                    append = True
                elif cursor.key().startswith(prefix):
                    compare = True
                for start, records in batch.slices():
                    keys = key_array.slice(start, len(records))
                    if compare:
                        times = batch.event_times[start : start + len(records)]
                        written += _put_newer(cursor, keys, records, times)
                    else:
                        written += _put_sorted(cursor, keys.to_pylist(), records, append=append)
        except lmdb.MapFullError as exc:
            raise self._full() from exc
        except lmdb.Error as exc:
            raise OnlineStoreError(f"LMDB write to {self.path} failed: {exc}") from exc
        return written

    def _full(self) -> OnlineStoreError:
        return OnlineStoreError(
            f"the LMDB online store at {self.path} is full ({self._map_size_mb} MiB): "
            "raise online_store.map_size_mb (it is virtual; the file grows as needed)"
        )

    def get_batch(
        self,
        feature_set: str,
        entity_keys: Sequence[str],
        features: Sequence[str],
        *,
        now_ms: int | None = None,
    ) -> list[FeatureRow]:
        now = epoch_ms() if now_ms is None else now_ms
        return self._read(
            feature_set,
            lambda get, prefix, schema: self._codec.decode(
                (get(prefix + key.encode()) for key in entity_keys), features, now, schema
            ),
        )

    def get_values(
        self,
        feature_set: str,
        entity_keys: Sequence[str],
        features: Sequence[str],
        *,
        now_ms: int | None = None,
        matrix: bool = False,
    ) -> FeatureValues:
        now = epoch_ms() if now_ms is None else now_ms
        return self._read(
            feature_set,
            lambda get, prefix, schema: self._codec.decode_values(
                [get(prefix + key.encode()) for key in entity_keys], features, now, schema, matrix=matrix
            ),
        )

    def _read(self, feature_set: str, decode: Callable[[Getter, bytes, Getter], _T]) -> _T:
        """``decode(get, key prefix, schema lookup)`` inside one read transaction."""
        env = self._live_env()
        prefix = self._prefixes.get(feature_set)
        if prefix is None:  # validated once per feature set: this is the serving path
            prefix = check_feature_set(feature_set).encode() + b"\0"
            if len(self._prefixes) < 4096:
                self._prefixes[feature_set] = prefix
        try:
            # buffers=True: values are memoryviews into the map, decoded without a copy
            # while the transaction is open.
            with env.begin(buffers=True) as txn:
                get = txn.get
                return decode(get, prefix, lambda schema_id: get(schema_key(schema_id)))
        except lmdb.BadValsizeError as exc:
            raise OnlineStoreError(
                f"{feature_set}: an entity key is longer than LMDB's {MAX_KEY_BYTES}-byte limit"
            ) from exc
        except lmdb.Error as exc:
            raise OnlineStoreError(f"LMDB read from {self.path} failed: {exc}") from exc

    def check(self) -> CheckReport:
        """Every record read and decoded, in a child process (see :mod:`serving.online_store.lmdb_verify`)."""
        from serving.online_store.lmdb_verify import check_online_item, verify_lmdb

        report = CheckReport(
            f"online store (LMDB at {self.path})",
            advice="records past a damaged page cannot be read: move the store aside and rebuild it "
            "from the lake (`headwater materialize <feature set> --start ... --end ...`)",
        )
        records, problems = verify_lmdb(self.path, check_online_item)
        report.checked = f"{records:,} records read and decoded"
        for where, problem in problems:
            report.error(where, problem)
        return report

    def close(self) -> None:
        if self._env is not None:
            _release_env(self._env)
            self._env = None


def _put_newer(cursor: lmdb.Cursor, key_array: pa.Array, records: list[bytes], times: I64) -> int:
    """Write the sorted, distinct keys whose stored record (if any) is not newer than theirs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    keys: list[bytes] = key_array.to_pylist()
    newer = list(zip(keys, records, strict=True))
    found = cursor.getmulti(keys)
    if found:  # stored event times are the records' first 8 bytes (see codec)
        stored = np.frombuffer(b"".join([record[:8] for _, record in found]), ">i8")
        found_keys = pa.array([key for key, _ in found], pa.binary())
        at = pc.index_in(found_keys, value_set=key_array).to_numpy()
        write = np.ones(len(keys), bool)
        write[at[stored > times[at]]] = False  # stored values are newer
        if not write.all():
            newer = list(itertools.compress(newer, write.tolist()))
    cursor.putmulti(newer)
    return len(newer)


def _put_sorted(cursor: lmdb.Cursor, keys: list[bytes], records: list[bytes], *, append: bool) -> int:
    """Write sorted, distinct keys none of which is stored; with ``append`` they follow every stored key."""
    _, added = cursor.putmulti(zip(keys, records, strict=True), append=append)
    if added != len(keys):  # LMDB refused a key as not after the last one: write them in place
        cursor.putmulti(zip(keys, records, strict=True))
    return len(keys)


def schema_key(schema_id: int) -> bytes:
    return SCHEMA_PREFIX + schema_id.to_bytes(8, "big", signed=True)
