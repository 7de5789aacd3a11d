"""Fixtures of the offline-store tests: a lake in a temporary data directory, stores over it.

The embedded (chdb) store always runs. The server mode needs a ClickHouse server >= 23 that
cannot be installed here: its tests run only when ``HEADWATER_TEST_CLICKHOUSE_URL`` names
one (``clickhouse://user:pass@host:9000/db``) and are skipped with that reason otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batch.offline_store import OfflineStore, open_offline_store
from headwater.settings import Settings, load_settings
from processors.lake import LakeWriter
from streams.catalog import SchemaCatalog

CLICKHOUSE_URL_VAR = "HEADWATER_TEST_CLICKHOUSE_URL"
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z


@pytest.fixture()
def lake_settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data")


@pytest.fixture()
def writer(lake_settings: Settings, catalog: SchemaCatalog) -> LakeWriter:
    return LakeWriter(lake_settings, catalog)


@pytest.fixture()
def store(lake_settings: Settings, catalog: SchemaCatalog) -> Iterator[OfflineStore]:
    with open_offline_store(lake_settings, catalog) as s:
        yield s


@pytest.fixture()
def clickhouse_url() -> str:
    url = os.environ.get(CLICKHOUSE_URL_VAR)
    if not url:
        reason = (
            f"server mode not tested: set {CLICKHOUSE_URL_VAR}=clickhouse://user:pass@host:9000/db to a "
            "ClickHouse server >= 23 (none can be installed on this machine; Debian's is 18.16)"
        )
        print(reason)
        pytest.skip(reason)
    return url


def feature_update(
    fs: str, entity: str, event_time: int, write_time: int, values: dict[str, Any], *, n: int = 0
) -> dict[str, Any]:
    return {
        "event_id": f"{fs}|{entity}|{event_time}|{write_time}|{n}",
        "feature_set": fs,
        "feature_set_version": 1,
        "entity_key": entity,
        "event_time": event_time,
        "write_time": write_time,
        "values": values,
        "source": "STREAM",
        "valid_until": None,  # no tiles: the values hold at any later time
        "tiles": None,
    }


def click(i: int, user: str = "u1", event_time: int | None = None) -> dict[str, Any]:
    return {
        "event_id": f"c{i}",
        "event_time": T0 + i * 1000 if event_time is None else event_time,
        "user_id": user,
        "item_id": f"item{i % 7}",
        "action": "CLICK" if i % 3 == 0 else "IMPRESSION",
        "position": 1 + i % 3,
        "campaign": "all",
        "propensity": 0.25,
        "session_id": None,
        "user_features": {"age": str(20 + i % 5)},
    }


Rows = Callable[[int, int], list[tuple[int, int, dict[str, Any]]]]
