"""Server mode (clickhouse-driver) runs the same SQL as the embedded store and gives the same answers.

Runs only when ``HEADWATER_TEST_CLICKHOUSE_URL`` names a ClickHouse server; skipped with the
reason printed otherwise (see conftest).
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from batch.offline_store import OfflineStore, get_historical_features, open_offline_store
from batch.offline_store.clickhouse import clickhouse_to_arrow
from headwater.settings import OfflineStoreSettings, Settings
from processors.lake import LakeWriter
from streams.catalog import SchemaCatalog
from tests.offline_store.conftest import T0, click, feature_update


def test_clickhouse_types_map_to_arrow() -> None:
    assert clickhouse_to_arrow("Nullable(Float64)") == pa.float64()
    assert clickhouse_to_arrow("Map(String, Nullable(Float64))") == pa.map_(pa.string(), pa.float64())
    assert clickhouse_to_arrow("Array(LowCardinality(String))") == pa.list_(pa.string())
    assert clickhouse_to_arrow("Tuple(a String)") is None


def test_server_mode_matches_the_embedded_store(
    clickhouse_url: str,
    lake_settings: Settings,
    writer: LakeWriter,
    store: OfflineStore,
    catalog: SchemaCatalog,
) -> None:
    writer.write("clicks", [(0, o, click(o)) for o in range(20)])
    writer.write("clicks", [(0, o, click(o)) for o in range(10)])  # a rewrite: must not duplicate
    writer.write(
        "feature-updates",
        [
            (0, 0, feature_update("u", "a", T0 + 100, T0 + 100, {"x": 1})),
            (0, 1, feature_update("u", "a", T0 + 200, T0 + 900, {"x": 2})),
        ],
    )
    server_settings = lake_settings.model_copy(
        update={"offline_store": OfflineStoreSettings(type="clickhouse", clickhouse_url=clickhouse_url)}
    )
    with open_offline_store(server_settings, catalog) as server:
        try:
            server.refresh()
            sql = "SELECT user_id, count() AS n FROM clicks GROUP BY user_id ORDER BY user_id"
            assert (
                server.query(sql).to_pylist() == store.query(sql).to_pylist() == [{"user_id": "u1", "n": 20}]
            )
            labels = pd.DataFrame({"entity_key": ["a", "a"], "label_time": [T0 + 500, T0 + 1000]})
            want = get_historical_features(store, labels, ["u:x"])
            got = get_historical_features(server, labels, ["u:x"])
            pd.testing.assert_frame_equal(got, want)
        finally:  # the test server's database is left as it was found
            for table in server.tables():
                server.execute(f"DROP VIEW IF EXISTS `{table}`")
                server.execute(f"DROP TABLE IF EXISTS `{table}__lake`")
            server.execute("DROP TABLE IF EXISTS _headwater_lake_files")
