"""The stored record format, the same on every backend, and its fast decoder.

A record is a 48-byte header of six big-endian signed 64-bit integers — event time, write
time, expires-at (epoch ms; 0 means never), schema id, valid-until (epoch ms; 0 means the
values hold at any later time) and values-end (the offset where the values end) — followed
by the feature values as one msgpack array and, up to the end, the update's window tiles
(:mod:`features.engine`; none when valid-until is 0). A *schema* is the tuple of feature
names of an update, stored once per store under its id (the 64-bit BLAKE2b of the
msgpack-encoded names) and cached by every process that reads it.

A read at ``now`` before valid-until returns the stored values (the fast path: nothing has
left a window yet). At or after it, the values are evaluated from the tiles at ``now``, and
the evaluation is remembered, by the tiles' bytes, until the next time a value can change,
so a record read again (an inactive user on every request) is evaluated once per change.

Why not a msgpack map per record: decoding a 50-key map builds 50 key strings on every read
(~10 µs); an array of values decodes in under 2 µs and is 40% smaller, and the names are
decoded once per process. Why the event time comes first: Redis' Lua script reads it from
the first 8 bytes to decide newer-wins without decoding anything else.

The serving read (:meth:`RecordCodec.decode_values`) also remembers the records it decoded,
by their bytes, with their values as a float64 row: a record read again (the items every
request scores) costs a dictionary lookup, and the request's feature matrix is gathered from
those rows instead of converted value by value (~1.2 µs an entity of 25 features).
"""

from __future__ import annotations

import hashlib
import operator
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import msgpack
import numpy as np

from features.engine import Evaluations
from headwater.errors import HeadwaterError
from serving.online_store.base import (
    FeatureRow,
    FeatureValues,
    OnlineStoreError,
    Row,
    Value,
    as_matrix,
    check_feature_set,
    epoch_ms,
)

__all__ = [
    "HEADER",
    "MAX_EVENT_TIME_MS",
    "Buffer",
    "PreparedRow",
    "RecordCodec",
    "check_record",
    "check_schema",
    "check_tiles",
    "event_time_of",
    "ttl_ms_of",
    "write_time_of",
]

HEADER = struct.Struct(">qqqqqq")
_END = HEADER.size
# Redis' Lua numbers are doubles: event times above 2**53 would compare inexactly there.
MAX_EVENT_TIME_MS = 2**53 - 1
_CACHE_LIMIT = 4096
# Evaluations remembered: entities read again before their next change (a feature set's
# entities on every request) skip the evaluation; ~2 KB each with 50 values.
_EVALUATIONS = 16_384
# Reads of fewer records convert their values directly: the decoded rows' lookups and gather
# cost more than they save on a record or two (measured: 3.3 µs against 2.5 for one).
_FEW = 8

Buffer = bytes | bytearray | memoryview
SchemaLoader = Callable[[int], Buffer | None]
_Projection = Callable[[list[Value]], dict[str, Value]]
_Picker = Callable[[list[Value]], Sequence[Value]]
_UNKNOWN = object()

_SCALAR_TYPES = frozenset({type(None), bool, int, float, str})
_STR_TYPE = frozenset({str})
_unpack_header = HEADER.unpack_from
_unpackb = msgpack.unpackb
_packb = msgpack.packb


class PreparedRow(NamedTuple):
    """An update validated and encoded once, before a backend's write loop."""

    entity_key: str
    event_time_ms: int
    expires_at_ms: int  # 0: never
    record: bytes


def event_time_of(record: Buffer) -> int:
    return int(_unpack_header(record)[0])


def check_tiles(feature_set: str, entity_key: str, valid_until: object, tiles: object) -> tuple[int, bytes]:
    """An update's (valid_until, tiles) as stored: (0, b"") when it has no tiles."""
    if tiles is None:
        return 0, b""
    if not isinstance(tiles, bytes | bytearray | memoryview) or type(valid_until) is not int:
        raise OnlineStoreError(
            f"{feature_set}/{entity_key}: tiles must be bytes with an integer valid_until (epoch ms), "
            f"got {type(tiles).__name__} and {valid_until!r}"
        )
    return valid_until, bytes(tiles)


def ttl_ms_of(ttl_s: float | None) -> int:
    """A put's ``ttl_s`` in milliseconds; 0 means no expiry."""
    if ttl_s is not None and not ttl_s > 0:
        raise OnlineStoreError(f"ttl_s must be positive or None (no expiry), got {ttl_s!r}")
    return 0 if ttl_s is None else max(1, round(ttl_s * 1000))


def write_time_of(write_time_ms: int | None) -> int:
    """A put's ``write_time_ms``, defaulting to now."""
    return epoch_ms() if write_time_ms is None else operator.index(write_time_ms)


def check_schema(schema_id: int, encoded: Buffer) -> str | None:
    """Why a stored schema is not one a write stored (None: it is): names that decode, and an id
    that is their hash. An integrity check (``headwater doctor``), not the read path."""
    try:
        names = _unpackb(bytes(encoded))
    except Exception as exc:  # garbage fails msgpack in more ways than it documents
        return f"schema {schema_id}: its names do not decode ({exc})"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"schema {schema_id}: not a list of feature names"
    actual = int.from_bytes(hashlib.blake2b(bytes(encoded), digest_size=8).digest(), "big", signed=True)
    if actual != schema_id:
        return f"schema {schema_id}: its names hash to {actual}, another id"
    return None


def check_record(record: Buffer, load_schema: SchemaLoader) -> str | None:
    """Why a stored record is not one a write stored (None: it is): a header of plausible times
    naming a schema the store holds, and as many scalar values as that schema has names, all
    decoded. An integrity check (``headwater doctor``), not the read path."""
    if len(record) < HEADER.size:
        return f"{len(record)} bytes, shorter than the {HEADER.size}-byte header"
    event_time, write_time, expires_at, schema_id, valid_until, end = _unpack_header(record)
    if not 0 <= event_time <= MAX_EVENT_TIME_MS:
        return f"event time {event_time} is not an epoch-ms time"
    if write_time < 0 or expires_at < 0 or (expires_at and expires_at < event_time):
        return f"write time {write_time} and expiry {expires_at} do not go with event time {event_time}"
    if not HEADER.size <= end <= len(record) or (valid_until and valid_until <= event_time):
        return f"values end {end} and valid-until {valid_until} do not fit a record of {len(record)} bytes"
    encoded = load_schema(schema_id)
    if encoded is None:
        return f"names schema {schema_id}, which the store does not hold"
    try:
        names = _unpackb(bytes(encoded))
        values = _unpackb(bytes(record[HEADER.size : end]))
        tiles = _unpackb(bytes(record[end:])) if valid_until else None
    except Exception as exc:  # garbage fails msgpack in more ways than it documents
        return f"values or tiles do not decode ({exc})"
    if valid_until and not (isinstance(tiles, list) and len(tiles) == 4 and isinstance(tiles[0], int)):
        return "tiles that are not an update's tiles"
    if not isinstance(values, list) or len(values) != len(names):
        return f"{len(values) if isinstance(values, list) else 'no'} values for {len(names)} feature names"
    if not _SCALAR_TYPES.issuperset(map(type, values)):
        return "values that are not scalars"
    return None


class RecordCodec:
    """Encodes batches of updates and decodes records; one per store instance.

    Caches schema ids by names (writes) and names plus the index arithmetic of each
    (schema, requested features) pair (reads), so a read does one msgpack call per record.
    """

    def __init__(self) -> None:
        self._ids: dict[tuple[str, ...], tuple[int, bytes]] = {}
        self._names: dict[int, tuple[str, ...]] = {}
        self._projections: dict[tuple[int, tuple[str, ...]], _Projection] = {}
        self._pickers: dict[tuple[int, tuple[str, ...]], _Picker | None] = {}
        # Per requested feature list: its picker per schema id, and the values of a missing row.
        self._plans: dict[tuple[str, ...], tuple[dict[int, _Picker | None], tuple[None, ...]]] = {}
        self._rows: dict[tuple[str, ...], _DecodedRows] = {}
        self._evaluations = Evaluations(_EVALUATIONS)

    def encode(
        self, feature_set: str, rows: Iterable[Row], ttl_s: float | None, write_time_ms: int | None
    ) -> tuple[list[PreparedRow], dict[int, bytes]]:
        """Validate and encode a batch, keeping only the newest update per entity.

        Returns the rows and the schemas they use (id -> encoded names), which the backend
        stores (create-only) along with the rows. Reducing to one update per entity first
        gives one backend write per entity and the same outcome as applying the updates one
        at a time under newer-wins (the last of equal event times wins).
        """
        check_feature_set(feature_set)
        ttl_ms = ttl_ms_of(ttl_s)
        write_time = write_time_of(write_time_ms)

        newest: dict[str, tuple[int, Row]] = {}
        for row in rows:
            entity_key, event_time_ms = row[0], row[1]
            try:
                event_time = operator.index(event_time_ms)
            except TypeError as exc:
                raise OnlineStoreError(
                    f"{feature_set}/{entity_key}: event time must be an integer (epoch ms), "
                    f"got {event_time_ms!r}"
                ) from exc
            kept = newest.get(entity_key)
            if kept is None or event_time >= kept[0]:
                newest[entity_key] = (event_time, row)

        prepared: list[PreparedRow] = []
        schemas: dict[int, bytes] = {}
        for entity_key, (event_time, row) in newest.items():
            values = row[2]
            valid_until, tiles = check_tiles(feature_set, entity_key, *row[3:]) if len(row) > 3 else (0, b"")
            if not isinstance(entity_key, str) or not entity_key:
                raise OnlineStoreError(
                    f"{feature_set}: entity keys must be non-empty strings, got {entity_key!r}"
                )
            if not 0 <= event_time <= MAX_EVENT_TIME_MS:
                raise OnlineStoreError(
                    f"{feature_set}/{entity_key}: event time {event_time} is outside 0..2**53-1 epoch ms"
                )
            body = values if type(values) is dict else dict(values)
            # Type checks over map() run in C: cheap enough for backfills of millions of rows.
            if not _SCALAR_TYPES.issuperset(map(type, body.values())) or not _STR_TYPE.issuperset(
                map(type, body)
            ):
                body = _normalize_values(feature_set, entity_key, body)
            names = tuple(body)
            schema = self.schema(names)
            schemas[schema[0]] = schema[1]
            try:
                payload = _packb(list(body.values()))
            except (OverflowError, TypeError, ValueError) as exc:
                raise OnlineStoreError(f"{feature_set}/{entity_key}: cannot encode values: {exc}") from exc
            expires_at = event_time + ttl_ms if ttl_ms else 0
            header = HEADER.pack(
                event_time, write_time, expires_at, schema[0], valid_until, _END + len(payload)
            )
            prepared.append(PreparedRow(entity_key, event_time, expires_at, header + payload + tiles))
        return prepared, schemas

    def schema(self, names: tuple[str, ...]) -> tuple[int, bytes]:
        """The id and encoded form of a tuple of feature names (the record's schema)."""
        return self._ids.get(names) or self._register(names)

    def _register(self, names: tuple[str, ...]) -> tuple[int, bytes]:
        encoded = _packb(list(names))
        schema_id = int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "big", signed=True)
        if len(self._ids) >= _CACHE_LIMIT:
            self._ids.clear()
        self._ids[names] = (schema_id, encoded)
        return schema_id, encoded

    def decode(
        self,
        records: Iterable[Buffer | None],
        features: Sequence[str],
        now: int,
        load_schema: SchemaLoader,
    ) -> list[FeatureRow]:
        """One :class:`FeatureRow` per record (None: missing); the read path, so kept lean.

        ``load_schema`` fetches an encoded schema by id from the store; it is called only the
        first time this process meets a schema.
        """
        feats = tuple(features)
        in_call: dict[int, _Projection] = {}  # avoids hashing ``feats`` once per record
        rows: list[FeatureRow] = []
        append = rows.append
        for record in records:
            if record is None:
                append(FeatureRow(dict.fromkeys(feats), None, None, None))
                continue
            event_time, write_time, expires_at, schema_id, valid_until, end = _unpack_header(record)
            if expires_at and now >= expires_at:
                append(FeatureRow(dict.fromkeys(feats), None, None, None))
                continue
            if valid_until and now >= valid_until:  # a tile left a window: evaluate them at now
                evaluated = self._evaluate(record, end, now)[1]
                values = {f: evaluated.get(f) for f in feats}
                append(FeatureRow(values, event_time, write_time, now - event_time))
                continue
            project = in_call.get(schema_id)
            if project is None:
                project = in_call[schema_id] = self._projection(schema_id, feats, load_schema)
            append(FeatureRow(project(_unpackb(record[_END:end])), event_time, write_time, now - event_time))
        return rows

    def decode_values(  # noqa: PLR0915 - the serving read loop, kept in one frame on purpose
        self,
        records: Iterable[Buffer | None],
        features: Sequence[str],
        now: int,
        load_schema: SchemaLoader,
        *,
        matrix: bool = False,
    ) -> FeatureValues:
        """:meth:`decode` without the dicts: per record the values in ``features`` order.

        When the record's schema is the requested list (the common case: a model reads a
        feature set's features in their declared order), the decoded msgpack array is
        returned as it is. ``matrix``: also the values as float64 (the serving path), through
        the decoded rows of this feature list (:class:`_DecodedRows`).
        """
        feats = features if type(features) is tuple else tuple(features)
        plan = self._plans.get(feats)
        if plan is None:
            if len(self._plans) >= _CACHE_LIMIT:
                self._plans.clear()
            plan = self._plans[feats] = ({}, (None,) * len(feats))
        pickers, missing = plan
        rows: _DecodedRows | None = None
        if matrix and not (isinstance(records, list) and len(records) < _FEW):
            rows = self._rows.get(feats)
            if rows is None or rows.stale():
                rows = self._rows[feats] = _DecodedRows(len(feats))
        known = rows.index if rows is not None else {}
        values: list[Sequence[Value]] = []
        times: list[int | None] = []
        at: list[int] = []  # with decoded rows: each record's row, or -1 - k for new[k]
        new: list[tuple[bytes | int, Sequence[Value]]] = []
        add_values, add_time, add_at = values.append, times.append, at.append
        key: bytes | int = b""  # a record's row in the decoded rows is found by this
        for record in records:
            if record is None:
                add_values(missing)
                add_time(None)
                add_at(0)
                continue
            event_time, _write_time, expires_at, schema_id, valid_until, end = _unpack_header(record)
            if expires_at and now >= expires_at:
                add_values(missing)
                add_time(None)
                add_at(0)
                continue
            evaluated: dict[str, Value] | None = None
            if valid_until and now >= valid_until:  # a tile left a window: evaluate them at now
                # The evaluation's token names its values while they hold: its row is decoded
                # rows' like a record's bytes (a new evaluation, a new token, a new row).
                key, evaluated = self._evaluate(record, end, now)
            elif rows is not None:
                key = bytes(record[24:end])  # schema id, valid-until, values: same bytes, same values
            if rows is not None:
                row = known.get(key)
                if row is not None:
                    add_values(rows.values[row])
                    add_time(event_time)
                    add_at(row)
                    continue
            picked: Sequence[Value]
            if evaluated is not None:
                picked = tuple(map(evaluated.get, feats))
            else:
                pick = pickers.get(schema_id, _UNKNOWN)
                if pick is _UNKNOWN:
                    pick = pickers[schema_id] = self._picker(schema_id, feats, load_schema)
                decoded: list[Value] = _unpackb(record[_END:end])
                picked = decoded if pick is None else pick(decoded)  # type: ignore[operator]
            add_values(picked)
            add_time(event_time)
            if rows is not None:
                add_at(-1 - len(new))
                new.append((key, picked))
        if rows is not None:
            return FeatureValues(values, times, rows.take(at, new))
        return FeatureValues(values, times, as_matrix(values, len(feats)) if matrix else None)

    def _evaluate(self, record: Buffer, end: int, now: int) -> tuple[int, dict[str, Value]]:
        """The values of a record's tiles at ``now`` (remembered until they can next change), with
        the token of that evaluation (see :meth:`Evaluations.entry`)."""
        try:
            return self._evaluations.entry(bytes(record[end:]), now)
        except HeadwaterError as exc:
            raise OnlineStoreError(f"cannot evaluate a record's windows at read time: {exc}") from exc
        except Exception as exc:  # corrupt tiles raise msgpack's and Python's errors alike
            raise OnlineStoreError(
                f"a record's window tiles are corrupt ({type(exc).__name__}: {exc}): rewrite the feature set"
            ) from exc

    def _positions(
        self, schema_id: int, feats: tuple[str, ...], load_schema: SchemaLoader
    ) -> list[int] | None:
        """Where each requested feature sits in a record of ``schema_id`` (``len(names)``: absent,
        read as None); None when the record holds exactly ``feats`` in that order."""
        names = self._names.get(schema_id)
        if names is None:
            encoded = load_schema(schema_id)
            if encoded is None:
                raise OnlineStoreError(
                    f"a record refers to feature schema {schema_id}, which the store does not hold: "
                    "it was written by a foreign or interrupted writer; rewrite the feature set"
                )
            names = self._names[schema_id] = tuple(_unpackb(encoded))
        if names == feats:
            return None
        position = {name: i for i, name in enumerate(names)}
        return [position.get(feature, len(names)) for feature in feats]

    def _picker(self, schema_id: int, feats: tuple[str, ...], load_schema: SchemaLoader) -> _Picker | None:
        """A function from a record's value array to the requested values; None: the array itself."""
        key = (schema_id, feats)
        if key in self._pickers:
            return self._pickers[key]
        indexes = self._positions(schema_id, feats, load_schema)
        pick: _Picker | None
        if indexes is None:
            pick = None
        elif len(indexes) == 1:
            only = indexes[0]

            def pick(values: list[Value]) -> Sequence[Value]:
                values.append(None)  # what an absent feature's position points at
                return (values[only],)

        elif not indexes:

            def pick(values: list[Value]) -> Sequence[Value]:
                return ()

        else:
            get = operator.itemgetter(*indexes)

            def pick(values: list[Value]) -> Sequence[Value]:
                values.append(None)
                picked: Sequence[Value] = get(values)
                return picked

        if len(self._pickers) >= _CACHE_LIMIT:
            self._pickers.clear()
        self._pickers[key] = pick
        return pick

    def _projection(self, schema_id: int, feats: tuple[str, ...], load_schema: SchemaLoader) -> _Projection:
        """A function from a record's value array to the requested {feature: value}."""
        cached = self._projections.get((schema_id, feats))
        if cached is not None:
            return cached
        pick = self._picker(schema_id, feats, load_schema)
        project: _Projection
        if pick is None:

            def project(values: list[Value]) -> dict[str, Value]:
                return dict(zip(feats, values, strict=True))

        else:
            picker = pick

            def project(values: list[Value]) -> dict[str, Value]:
                return dict(zip(feats, picker(values), strict=True))

        if len(self._projections) >= _CACHE_LIMIT:
            self._projections.clear()
        self._projections[(schema_id, feats)] = project
        return project


class _DecodedRows:
    """Values of records this process decoded, by their bytes: a record read again (a hot item)
    is neither decoded nor converted again, and its float64 row is gathered with the others.

    Exact by construction: a record's schema id and value bytes determine its values; a
    changed record has other bytes. Row 0 is a missing entity's (NaN). Bounded: at ``LIMIT``
    rows (~1.5 KB each with 25 values) it takes no more; if fewer than half of the lookups of
    the next ``RENEW_AFTER`` hit (the hot records changed, or there are none: every call reads
    another user), an empty one replaces it. Readers look rows up without a lock (an entry is
    published once its row is written); :meth:`take` adds under one, as the service reads from
    several threads.
    """

    LIMIT = 8192
    RENEW_AFTER = 16 * LIMIT

    def __init__(self, width: int) -> None:
        self.index: dict[bytes | int, int] = {}  # a record's bytes or an evaluation's token
        self.values: list[Sequence[Value]] = [(None,) * width]
        self.data = np.full((256, width), np.nan)
        self.numeric = True  # False once a value is not a number: no matrices for this list
        self.lookups = self.hits = 0  # since it filled up
        self._lock = threading.Lock()

    def stale(self) -> bool:
        return self.lookups >= self.RENEW_AFTER and 2 * self.hits < self.lookups

    def take(self, at: list[int], new: list[tuple[bytes | int, Sequence[Value]]]) -> np.ndarray | None:
        """The float64 rows of a read (``at``: known rows, or ``-1 - k`` for ``new[k]``), after
        adding the ``new`` ones while there is room; None when not all values are numbers."""
        with self._lock:
            block: np.ndarray | None = None
            if new and self.numeric:
                block = as_matrix([picked for _, picked in new], self.data.shape[1])
                self.numeric = block is not None
            if not self.numeric:
                return None
            start = len(self.values)
            if start > self.LIMIT:  # full: this read's new rows are not kept
                self.lookups += len(at)
                self.hits += len(at) - len(new)
                if not new:
                    return self.data[at]
                assert block is not None
                where = np.asarray(at)
                out = np.empty((len(at), block.shape[1]))
                kept = where >= 0
                out[kept] = self.data[where[kept]]
                out[~kept] = block[-1 - where[~kept]]
                return out
            if new:
                assert block is not None
                end = start + len(new)
                if end > len(self.data):
                    grown = np.full((max(end, 2 * len(self.data)), self.data.shape[1]), np.nan)
                    grown[:start] = self.data[:start]
                    self.data = grown
                self.data[start:end] = block
                self.values.extend(picked for _, picked in new)
                for k, (body, _) in enumerate(new):
                    self.index[body] = start + k
                at = [start - 1 - i if i < 0 else i for i in at]
            return self.data[at]


def _normalize_values(feature_set: str, entity_key: str, body: Mapping[object, object]) -> dict[str, Value]:
    """The slow path: accept subclasses and numpy scalars (pandas backfills), reject the rest."""
    clean: dict[str, Value] = {}
    for name, value in body.items():
        if not isinstance(name, str):
            raise OnlineStoreError(f"{feature_set}/{entity_key}: feature names must be strings, got {name!r}")
        item = value.item() if hasattr(value, "item") and hasattr(value, "dtype") else value
        for scalar in (bool, int, float, str):  # bool first: it is an int subclass
            if isinstance(item, scalar):
                clean[str(name)] = scalar(item)
                break
        else:
            if item is not None:
                raise OnlineStoreError(
                    f"{feature_set}/{entity_key}: feature {name!r} has a {type(value).__name__}; "
                    "values must be None, bool, int, float or str"
                )
            clean[str(name)] = None
    return clean
