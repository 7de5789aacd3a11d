"""The online feature store: latest values per (feature set, entity), served in microseconds.

    from serving.online_store import open_online_store

    with open_online_store(settings) as store:
        store.put_batch("user_activity", [("u1", 1_700_000_000_000, {"clicks_1h": 3})], ttl_s=86_400)
        row, = store.get_batch("user_activity", ["u1"], ["clicks_1h"])
        row.values, row.event_time_ms, row.age_ms
        # The serving path: values in the requested order, no dicts.
        store.get_values("user_activity", ["u1"], ["clicks_1h"]).values  # [[3]]
        # Many entities at once (backfills): an Arrow table of entity_key, event_time, features.
        store.put_columns("user_activity", table, ttl_s=86_400)

Backends, selected by ``settings.online_store.type``: ``lmdb`` (embedded default),
``redis``, ``aerospike``. Each is imported only when selected. The semantics — newer-wins
on event time, TTL by event time, batched reads — are in :mod:`serving.online_store.base`
and are checked against every reachable backend by ``tests/online_store/test_contract.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headwater.errors import ConfigError
from serving.online_store.base import FeatureRow, FeatureValues, OnlineStore, OnlineStoreError, Row, Value

if TYPE_CHECKING:
    from headwater.settings import Settings

__all__ = [
    "FeatureRow",
    "FeatureValues",
    "OnlineStore",
    "OnlineStoreError",
    "Row",
    "Value",
    "open_online_store",
]


def open_online_store(settings: Settings) -> OnlineStore:
    """Open the backend that ``settings.online_store.type`` names; close it when done."""
    cfg = settings.online_store
    try:
        # Imported here, not at the top: a process pays only for the client it uses.
        if cfg.type == "lmdb":
            from serving.online_store.lmdb import LmdbOnlineStore

            return LmdbOnlineStore(settings.online_store_path, map_size_mb=cfg.map_size_mb)
        if cfg.type == "redis":
            from serving.online_store.redis import RedisOnlineStore

            return RedisOnlineStore(cfg.redis_url, key_prefix=cfg.redis_key_prefix)
        if cfg.type == "aerospike":
            if not cfg.aerospike_hosts:
                raise ConfigError(
                    "online_store.type=aerospike but online_store.aerospike_hosts is not set: "
                    "set HEADWATER_ONLINE_STORE__AEROSPIKE_HOSTS=host:port"
                )
            # Raises ConfigError naming `pip install aerospike` when the client is missing.
            from serving.online_store.aerospike import AerospikeOnlineStore

            return AerospikeOnlineStore(
                cfg.aerospike_hosts, cfg.aerospike_namespace, set_name=cfg.aerospike_set
            )
    except ModuleNotFoundError as exc:
        if exc.name not in {"lmdb", "redis", "msgpack"}:
            raise
        raise ConfigError(
            f"online_store.type={cfg.type} needs the {exc.name} package: pip install {exc.name} "
            "(or re-run `make setup`)"
        ) from exc
    raise ConfigError(f"online_store.type={cfg.type!r} is not one of aerospike, lmdb, redis")
