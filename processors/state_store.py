"""Durable processor state kept with the input positions it reflects, in one LMDB transaction.

Why not Kafka transactions or a Faust changelog: the embedded broker accepts transaction
calls but shows aborted records to ``read_committed`` readers, so exactly-once produce is not
available there; and a changelog written ahead of the committed offsets double-applies state
after a crash. Storing the state and the offsets it reflects atomically, and seeking to those
offsets on start, makes the state exact after any crash; outputs are re-emitted identically
(deterministic ids and values) and every consumer of them is idempotent (DESIGN.md §5).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import lmdb

from headwater.errors import HeadwaterError
from headwater.integrity import CheckReport

__all__ = ["META_PREFIX", "Position", "StateStore", "StoredStates", "check_state_item", "check_state_stores"]

Position = tuple[str, int]  # physical topic, partition
_POSITIONS = b"\x00positions"
# LMDB keys hold at most 511 bytes, and an entity key is whatever an event says (a 600-character
# item id stopped the item feature processor at every commit). A key that long, or one starting
# with a byte reserved here, is stored under _HASHED + its SHA-256, with the key itself kept
# under _ORIGINAL + the same digest so that iteration still yields it.
_MAX_KEY_BYTES = 511
_HASHED, _ORIGINAL = b"\x01", b"\x02"
# State keys starting with this are a processor's own bookkeeping (its watermarks): committed with
# the states and positions like any state, but not states, so never listed by state_keys.
META_PREFIX = "\x00meta:"
_META = META_PREFIX.encode()


def _stored(key: str) -> tuple[bytes, bytes | None]:
    """The LMDB key of a state key, and the digest it is stored under (None: stored as itself)."""
    raw = key.encode()
    if raw.startswith(_META):  # a processor's bookkeeping: stored as it is, never listed as a state
        return raw, None
    if len(raw) <= _MAX_KEY_BYTES and raw[:1] not in (b"\x00", _HASHED, _ORIGINAL):
        return raw, None
    digest = hashlib.sha256(raw).digest()
    return _HASHED + digest, digest


class StateStore:
    """Key -> bytes state of one processor plus its input positions, committed together."""

    def __init__(self, path: Path, map_size_mb: int = 4096) -> None:
        path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(str(path), map_size=map_size_mb << 20, subdir=True, max_dbs=0)
        except lmdb.Error as exc:
            raise HeadwaterError(f"cannot open processor state at {path}: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        with self._env.begin() as txn:
            value = txn.get(_stored(key)[0])
            return None if value is None else bytes(value)

    def state_keys(self) -> Iterator[str]:
        """Keys of the states (a processor's own bookkeeping, under META_PREFIX, left out)."""
        with self._env.begin() as txn:
            for raw in txn.cursor().iternext(keys=True, values=False):
                first = bytes(raw[:1])
                if first == _HASHED:
                    original = txn.get(_ORIGINAL + bytes(raw[1:]))
                    if original is not None:
                        yield bytes(original).decode()
                elif first not in (b"\x00", _ORIGINAL):
                    yield bytes(raw).decode()

    def positions(self) -> dict[Position, int]:
        """Next offset to read per input partition, as of the last commit."""
        with self._env.begin() as txn:
            raw = txn.get(_POSITIONS)
        if raw is None:
            return {}
        return {(t, int(p)): o for t, p, o in json.loads(bytes(raw))}

    def commit(self, changes: Mapping[str, bytes | None], positions: Mapping[Position, int]) -> None:
        """Write state changes (None deletes) and advance positions, atomically and durably."""
        merged = {**self.positions(), **positions}
        with self._env.begin(write=True) as txn:
            for key, value in changes.items():
                stored, digest = _stored(key)
                if value is None:
                    txn.delete(stored)
                    if digest is not None:
                        txn.delete(_ORIGINAL + digest)
                else:
                    txn.put(stored, value)
                    if digest is not None:
                        txn.put(_ORIGINAL + digest, key.encode())
            txn.put(_POSITIONS, json.dumps([[t, p, o] for (t, p), o in merged.items()]).encode())

    def reset_positions(self) -> None:
        """Forget the input positions (a new, empty broker starts every offset at 0); keep the state."""
        with self._env.begin(write=True) as txn:
            txn.delete(_POSITIONS)

    def close(self) -> None:
        self._env.close()


def check_state_stores(state_root: Path) -> CheckReport:
    """Every processor's state store under ``state_root`` read whole (``headwater doctor``): LMDB's
    pages, keys, and the input positions; the values are the processors' own bytes."""
    from serving.online_store.lmdb_verify import verify_lmdb  # the LMDB page reader both stores share

    report = CheckReport(
        f"processor state {state_root}",
        advice="move a damaged store aside: its processor rebuilds it from its input topics' "
        "beginning (as far as the broker still holds them)",
    )
    stores = sorted(p for p in state_root.iterdir() if p.is_dir()) if state_root.is_dir() else []
    total = 0
    for store in stores:
        records, problems = verify_lmdb(store, check_state_item)
        total += records
        for where, problem in problems:
            report.error(f"{store.name}: {where}", problem)
    report.checked = f"{len(stores)} stores, {total:,} records read"
    return report


def check_state_item(key: bytes, value: bytes, _get: object) -> str | None:
    """A state key is text (or a long key's digest, whose original key is kept as text); the
    positions record is a list of [topic, partition, offset]."""
    if key[:1] == _HASHED:
        return None if len(key) == 33 else "a hashed state key of the wrong length"
    if key != _POSITIONS:
        try:
            (value if key[:1] == _ORIGINAL else key).decode()
        except UnicodeDecodeError:
            return "a state key that is not text"
        return None
    try:
        positions = json.loads(value)
        ok = all(isinstance(t, str) and isinstance(p, int) and isinstance(o, int) for t, p, o in positions)
    except (ValueError, TypeError):
        ok = False
    return None if ok else "the input positions do not decode"


class Serializable(Protocol):
    def to_bytes(self) -> bytes: ...


S = TypeVar("S", bound=Serializable)


class StoredStates(MutableMapping[str, S], Generic[S]):
    """A write-back cache over a :class:`StateStore`: the mapping a pure processor mutates.

    Every entity read or written since the last :meth:`changes` is treated as dirty, since pure
    logic may mutate a state object in place after reading it.
    """

    def __init__(self, store: StateStore, decode: type[S] | None = None) -> None:
        self._store = store
        self._decode = decode
        self._cache: dict[str, S] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()

    def _load(self, key: str) -> S | None:
        raw = self._store.get(key)
        if raw is None or self._decode is None:
            return None
        return self._decode.from_bytes(raw)  # type: ignore[attr-defined, no-any-return]

    def __getitem__(self, key: str) -> S:
        value = self._cache.get(key)
        if value is None and key not in self._deleted:
            value = self._load(key)
            if value is not None:
                self._cache[key] = value
        if value is None:
            raise KeyError(key)
        self._dirty.add(key)
        return value

    def __setitem__(self, key: str, value: S) -> None:
        self._cache[key] = value
        self._dirty.add(key)
        self._deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        self._cache.pop(key, None)
        self._dirty.discard(key)
        self._deleted.add(key)

    def __iter__(self) -> Iterator[str]:
        seen = set(self._cache)
        yield from self._cache
        for key in self._store.state_keys():
            if key not in seen and key not in self._deleted:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def changes(self, max_cached: int = 200_000) -> dict[str, bytes | None]:
        """State to commit since the last call; trims the cache when it grows past ``max_cached``."""
        out: dict[str, bytes | None] = {k: self._cache[k].to_bytes() for k in self._dirty}
        out.update(dict.fromkeys(self._deleted))
        self._dirty.clear()
        self._deleted.clear()
        if len(self._cache) > max_cached:
            self._cache.clear()
        return out
