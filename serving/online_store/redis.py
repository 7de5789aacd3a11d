"""Redis online store: one string key per (feature set, entity) holding the shared record.

Keys: ``<prefix><feature set>:<entity>`` for records (see :mod:`serving.online_store.codec`),
``<prefix>#schema:<id>`` for the feature-name schemas they refer to.

Newer-wins runs server-side in a Lua script per key — Redis executes a script atomically,
so compare-and-set holds with any number of writer processes and needs no WATCH retries.
A batch of writes is one pipeline (one round trip); a batch of reads is one MGET.
Each script touches a single key, so writes also work on Redis Cluster; MGET there needs
keys of one hash slot (redis-py's cluster client splits it).

Records with a TTL also get a Redis expiry at the same instant (``SET ... PXAT``), so Redis
reclaims expired rows by itself. A record already expired when written is dropped at once;
reads check expiry against ``now_ms`` as every backend does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis

from headwater.settings import redact_url
from serving.online_store.base import (
    FeatureRow,
    FeatureValues,
    OnlineStore,
    OnlineStoreError,
    Row,
    check_feature_set,
    epoch_ms,
)
from serving.online_store.codec import PreparedRow, RecordCodec

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["RedisOnlineStore"]

# KEYS[1] record key; ARGV[1] event time; ARGV[2] record; ARGV[3] expires-at ms (0: never).
# The stored event time is the record's first 8 bytes, big-endian: read them byte by byte
# (exact below 2**53, which prepare_rows enforces) instead of decoding the whole record.
_NEWER_WINS = """
local current = redis.call('GET', KEYS[1])
if current then
  local stored = 0
  for i = 1, 8 do stored = stored * 256 + string.byte(current, i) end
  if stored > tonumber(ARGV[1]) then return 0 end
end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
end
return 1
"""

# Rows per pipeline: bounds client memory and server reply buffers on big backfills.
_PIPELINE_ROWS = 2000


class RedisOnlineStore(OnlineStore):
    """Online store in the Redis at ``url``; keys are ``<key_prefix><feature set>:<entity>``."""

    backend = "redis"

    def __init__(self, url: str, key_prefix: str = "hw:") -> None:
        self._key_prefix = key_prefix
        try:
            self._client: redis.Redis[bytes] = redis.Redis.from_url(url)
        except ValueError as exc:
            raise OnlineStoreError(f"invalid online_store.redis_url {redact_url(url)!r}: {exc}") from exc
        kwargs = self._client.connection_pool.connection_kwargs
        # Named by host, port and db only: the URL may carry a password.
        self._where = f"redis at {kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        self._newer_wins = self._client.register_script(_NEWER_WINS)
        self._codec = RecordCodec()

    def _schema_key(self, schema_id: int) -> str:
        return f"{self._key_prefix}#schema:{schema_id}"

    def _key_prefix_for(self, feature_set: str) -> bytes:
        return f"{self._key_prefix}{check_feature_set(feature_set)}:".encode()

    def _failed(self, action: str, exc: redis.RedisError) -> OnlineStoreError:
        return OnlineStoreError(
            f"{action} on {self._where} failed: {exc}. Is redis-server running there? "
            "Check online_store.redis_url"
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
        return self._write(feature_set, prepared, schemas)

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
        return self._write(feature_set, batch.prepared(), batch.schemas)

    def _write(self, feature_set: str, prepared: list[PreparedRow], schemas: dict[int, bytes]) -> int:
        """Newer-wins writes of encoded rows, a pipeline of scripts per chunk."""
        prefix = self._key_prefix_for(feature_set)
        written = 0
        try:
            for start in range(0, len(prepared), _PIPELINE_ROWS):
                pipe = self._client.pipeline(transaction=False)
                if start == 0:
                    # Commands of a pipeline run in order: schemas exist before any record
                    # that refers to them.
                    for schema_id, names in schemas.items():
                        pipe.set(self._schema_key(schema_id), names, nx=True)
                for row in prepared[start : start + _PIPELINE_ROWS]:
                    self._newer_wins(
                        keys=[prefix + row.entity_key.encode()],
                        args=[row.event_time_ms, row.record, row.expires_at_ms],
                        client=pipe,
                    )
                results: list[Any] = pipe.execute()
                written += sum(r for r in results if type(r) is int)  # SET NX replies are not counted
        except redis.RedisError as exc:
            raise self._failed(f"writing {feature_set}", exc) from exc
        return written

    def get_batch(
        self,
        feature_set: str,
        entity_keys: Sequence[str],
        features: Sequence[str],
        *,
        now_ms: int | None = None,
    ) -> list[FeatureRow]:
        if not entity_keys:
            return []
        now = epoch_ms() if now_ms is None else now_ms
        return self._codec.decode(self._records(feature_set, entity_keys), features, now, self._load_schema)

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
        records = self._records(feature_set, entity_keys) if entity_keys else []
        return self._codec.decode_values(records, features, now, self._load_schema, matrix=matrix)

    def _records(self, feature_set: str, entity_keys: Sequence[str]) -> list[bytes | None]:
        """The stored records of the entities, in order (None where missing): one MGET."""
        prefix = self._key_prefix_for(feature_set)
        try:
            records: list[bytes | None] = self._client.mget([prefix + key.encode() for key in entity_keys])
        except redis.RedisError as exc:
            raise self._failed(f"reading {feature_set}", exc) from exc
        return records

    def _load_schema(self, schema_id: int) -> bytes | None:
        # Once per schema per process: the codec caches what it gets.
        try:
            return self._client.get(self._schema_key(schema_id))
        except redis.RedisError as exc:
            raise self._failed("reading a feature schema", exc) from exc

    def close(self) -> None:
        self._client.close()
