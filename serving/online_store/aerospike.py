"""Aerospike online store: the production choice of the brief (server >= 6, client >= 7).

One record per (feature set, entity) in one set of the namespace, user key
``<feature set>:<entity>``, a single blob bin ``r`` holding the shared record format of
:mod:`serving.online_store.codec` (bin names are limited to 15 characters, so features cannot
be bins of their own). Feature-name schemas are records with user key ``#schema:<id>``.

Newer-wins is an optimistic read-modify-write without UDFs: a batch read fetches the stored
records and their generations, then each newer update is written with a generation check
(``POLICY_GEN_EQ``), or create-only when the record did not exist; a write that lost a race
re-reads that record and decides again. Records with a TTL get the matching Aerospike TTL
(at least one second: 0 would mean the namespace default). Reads are one ``batch_read``.

The ``aerospike`` client is optional: ``pip install aerospike``. No server can run on the
embedded stack; the contract suite runs against one when ``HEADWATER_TEST_AEROSPIKE_HOSTS``
points at it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

from headwater.errors import ConfigError
from serving.online_store.base import (
    FeatureRow,
    OnlineStore,
    OnlineStoreError,
    Row,
    check_feature_set,
    epoch_ms,
)
from serving.online_store.codec import Buffer, PreparedRow, RecordCodec, event_time_of

try:
    import aerospike
    from aerospike import exception as aerospike_exception
except ModuleNotFoundError as exc:
    raise ConfigError(
        "online_store.type=aerospike needs the Aerospike Python client: pip install aerospike"
    ) from exc

__all__ = ["AerospikeOnlineStore", "parse_hosts"]


_BIN = "r"
# A key written by many writers at once may lose a few CAS rounds; more means something is
# rewriting it in a loop, and the caller should hear about it.
_MAX_CAS_ATTEMPTS = 20


def parse_hosts(hosts: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` (port defaults to 3000) into the client's host tuples."""
    parsed = []
    for item in (part.strip() for part in hosts.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "3000")
        try:
            parsed.append((host, int(port)))
        except ValueError as exc:
            raise ConfigError(f"online_store.aerospike_hosts: bad port in {item!r}; use host:port") from exc
    if not parsed:
        raise ConfigError("online_store.aerospike_hosts is empty: set it to host:port[,host:port]")
    return parsed


class AerospikeOnlineStore(OnlineStore):
    """Online store in the Aerospike cluster at ``hosts``, records in ``namespace``/``set_name``."""

    backend = "aerospike"

    def __init__(self, hosts: str, namespace: str, set_name: str = "headwater_features") -> None:
        self._namespace = namespace
        self._set = set_name
        self._where = f"aerospike at {hosts} ({namespace}/{set_name})"
        try:
            client = aerospike.client({"hosts": parse_hosts(hosts)})
            # Clients >= 7 connect in client(); older ones need connect().
            if not client.is_connected():
                client.connect()
        except aerospike_exception.AerospikeError as exc:
            raise OnlineStoreError(
                f"cannot connect to {self._where}: {exc}. "
                "Is the server up? Check online_store.aerospike_hosts"
            ) from exc
        self._client: Any = client
        self._codec = RecordCodec()

    def _key(self, feature_set: str, entity_key: str) -> tuple[str, str, str]:
        return (self._namespace, self._set, f"{feature_set}:{entity_key}")

    def _stored(self, keys: list[tuple[str, str, str]]) -> list[tuple[int, int] | None]:
        """(generation, event time) of each stored record, None where there is none."""
        batch = self._client.batch_read(keys, [_BIN])
        stored: list[tuple[int, int] | None] = []
        for item in batch.batch_records:
            record = item.record if item.result == 0 else None
            if record is None or not record[2] or _BIN not in record[2]:
                stored.append(None)
            else:
                stored.append((record[1]["gen"], event_time_of(record[2][_BIN])))
        return stored

    def _reread(self, key: tuple[str, str, str]) -> tuple[int, int] | None:
        try:
            _, meta, bins = self._client.get(key)
        except aerospike_exception.RecordNotFound:
            return None
        return (meta["gen"], event_time_of(bins[_BIN]))

    def _write_newer(
        self, key: tuple[str, str, str], row: PreparedRow, stored: tuple[int, int] | None
    ) -> bool:
        bins = {_BIN: bytearray(row.record)}
        ttl = aerospike.TTL_NEVER_EXPIRE
        if row.expires_at_ms:
            ttl = max(1, math.ceil((row.expires_at_ms - epoch_ms()) / 1000))
        for _ in range(_MAX_CAS_ATTEMPTS):
            if stored is not None and stored[1] > row.event_time_ms:
                return False
            try:
                if stored is None:
                    self._client.put(
                        key, bins, meta={"ttl": ttl}, policy={"exists": aerospike.POLICY_EXISTS_CREATE}
                    )
                else:
                    self._client.put(
                        key,
                        bins,
                        meta={"gen": stored[0], "ttl": ttl},
                        policy={"gen": aerospike.POLICY_GEN_EQ},
                    )
                return True
            except (aerospike_exception.RecordGenerationError, aerospike_exception.RecordExistsError):
                stored = self._reread(key)  # another writer got there first: decide again
        raise OnlineStoreError(
            f"{key[2]}: gave up after {_MAX_CAS_ATTEMPTS} conflicting concurrent writes on {self._where}"
        )

    def put_batch(
        self,
        feature_set: str,
        rows: Iterable[Row],
        *,
        ttl_s: float | None = None,
        write_time_ms: int | None = None,
    ) -> int:
        prepared, schemas = self._codec.encode(feature_set, rows, ttl_s, write_time_ms)
        if not prepared:
            return 0
        keys = [self._key(feature_set, row.entity_key) for row in prepared]
        try:
            for schema_id, names in schemas.items():
                self._put_schema(schema_id, names)
            stored = self._stored(keys)
            return sum(
                self._write_newer(key, row, current)
                for key, row, current in zip(keys, prepared, stored, strict=True)
            )
        except aerospike_exception.AerospikeError as exc:
            raise OnlineStoreError(f"writing {feature_set} to {self._where} failed: {exc}") from exc

    def get_batch(
        self,
        feature_set: str,
        entity_keys: Sequence[str],
        features: Sequence[str],
        *,
        now_ms: int | None = None,
    ) -> list[FeatureRow]:
        now = epoch_ms() if now_ms is None else now_ms
        check_feature_set(feature_set)
        if not entity_keys:
            return []
        try:
            batch = self._client.batch_read([self._key(feature_set, key) for key in entity_keys], [_BIN])
        except aerospike_exception.AerospikeError as exc:
            raise OnlineStoreError(f"reading {feature_set} from {self._where} failed: {exc}") from exc
        records: list[Buffer | None] = []
        for item in batch.batch_records:
            bins = item.record[2] if item.result == 0 and item.record is not None else None
            records.append(bins[_BIN] if bins and _BIN in bins else None)
        return self._codec.decode(records, features, now, self._load_schema)

    def _schema_key(self, schema_id: int) -> tuple[str, str, str]:
        # '#' cannot start a feature set name, so this never collides with a record key.
        return (self._namespace, self._set, f"#schema:{schema_id}")

    def _put_schema(self, schema_id: int, names: bytes) -> None:
        # Schemas are immutable: if one is stored under this id, it is this one.
        with contextlib.suppress(aerospike_exception.RecordExistsError):
            self._client.put(
                self._schema_key(schema_id),
                {_BIN: bytearray(names)},
                meta={"ttl": aerospike.TTL_NEVER_EXPIRE},
                policy={"exists": aerospike.POLICY_EXISTS_CREATE},
            )

    def _load_schema(self, schema_id: int) -> Buffer | None:
        try:
            _, _, bins = self._client.get(self._schema_key(schema_id))
        except aerospike_exception.RecordNotFound:
            return None
        except aerospike_exception.AerospikeError as exc:
            raise OnlineStoreError(f"reading a feature schema from {self._where} failed: {exc}") from exc
        value: Buffer = bins[_BIN]
        return value

    def close(self) -> None:
        self._client.close()
