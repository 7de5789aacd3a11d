"""`headwater features list | describe` and `headwater backfill`, on a real lake and LMDB.

The commands are mounted on a bare Typer app as the CLI mounts them (``register(app)``);
settings go in as the context object. Figures are checked against the same numbers
computed here from the backfilled lake rows with pandas.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner, Result

from headwater.cli.features import parse_time, register
from headwater.errors import HeadwaterError
from headwater.sample_data import merged_events
from headwater.settings import Settings, load_settings
from processors.lake import LakeReader, LakeWriter
from serving.online_store import open_online_store
from streams.catalog import SchemaCatalog

runner = CliRunner()
START, END = "2019-11-24", "2019-12-01"  # the whole sample


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Stands in for the real root callback, which puts the Settings in ctx.obj."""

    register(app)
    return app


def invoke(settings: Settings, *args: str) -> Result:
    return runner.invoke(_app(), list(args), obj=settings)


@pytest.fixture(scope="module")
def clicks_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("clicks-lake"))
    clicks = [record for topic, record in merged_events() if topic == "clicks"]
    LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir)).write(
        "clicks", [(i % 3, i // 3, record) for i, record in enumerate(clicks)]
    )
    return settings.lake_dir / "clicks"


@pytest.fixture()
def lake_settings(tmp_path: Path, clicks_lake: Path) -> Settings:
    settings = load_settings(data_dir=tmp_path / "data")
    shutil.copytree(clicks_lake, settings.lake_dir / "clicks")
    return settings


def model_event(version: int, refs: list[str]) -> dict[str, Any]:
    return {
        "event_id": f"ctr-{version}", "event_time": 1_574_553_634_762, "model_name": "ctr_model",
        "kind": "VERSION_REGISTERED", "version": version, "alias": None, "previous_version": None,
        "artifact_uri": None, "artifact_sha256": None, "feature_refs": refs, "metrics": {}, "metadata": {},
        "actor": "tests", "reason": None, "forced": False,
    }  # fmt: skip


def test_backfill_command_writes_both_stores_or_only_the_lake(lake_settings: Settings) -> None:
    result = invoke(lake_settings, "backfill", "user_activity", "--start", START, "--end", END)
    assert result.exit_code == 0, result.output
    assert "29,734 updates of 296 entities" in result.output
    assert "296 of 296 entities written" in result.output and "past the 7d TTL" in result.output

    result = invoke(lake_settings, "backfill", "item_activity", "--start", START, "--end", END, "--no-online")
    assert result.exit_code == 0, result.output
    assert "online store" not in result.output
    with open_online_store(lake_settings) as store:
        (row,) = store.get_batch("item_activity", ["14"], ["clicks_24h"], now_ms=1_575_158_400_000)
        assert not row.found
        (row,) = store.get_batch(
            "user_activity", ["a27849087c3cf220"], ["clicks_24h"], now_ms=1_575_158_400_000
        )
        assert row.found

    # `materialize` copies the offline values the --no-online backfill left out.
    result = invoke(lake_settings, "materialize", "item_activity", "--start", START, "--end", END)
    assert result.exit_code == 0, result.output
    assert "80 of 80 entities written online" in " ".join(result.output.split())
    with open_online_store(lake_settings) as store:
        (row,) = store.get_batch("item_activity", ["14"], ["clicks_24h"], now_ms=1_575_158_400_000)
        assert row.found


def test_list_shows_every_feature_set_with_its_offline_figures(lake_settings: Settings) -> None:
    before = json.loads(invoke(lake_settings, "features", "list", "--json").stdout)
    assert [(r["name"], r["rows"], r["freshness"]) for r in before] == [
        ("user_activity", 0, "-"),
        ("item_activity", 0, "-"),
    ]
    invoke(lake_settings, "backfill", "item_activity", "--start", START, "--end", END)
    rows = {r["name"]: r for r in json.loads(invoke(lake_settings, "features", "list", "--json").stdout)}
    item = rows["item_activity"]
    assert (item["entity"], item["source"], item["features"], item["rows"], item["entities"]) == (
        "item_id", "clicks", 12, 30_000, 80,
    )  # fmt: skip
    assert item["owner"] == "recommendations@headwater.dev"
    assert item["freshness"].endswith("d") and int(item["freshness"][:-1]) > 365  # the 2019 sample
    assert item["last_update"].startswith(pd.Timestamp.now(tz="UTC").strftime("%Y-"))
    table = invoke(lake_settings, "features", "list")
    assert table.exit_code == 0 and "item_activity v1" in table.output and "30,000" in table.output


def test_describe_computes_the_figures_in_clickhouse(lake_settings: Settings) -> None:
    invoke(lake_settings, "backfill", "user_activity", "--start", START, "--end", END)
    LakeWriter(lake_settings, SchemaCatalog.load(lake_settings.schemas_dir)).write(
        "models",
        [(0, 0, model_event(1, ["user_activity:clicks_24h", "item_activity:ctr_24h"])),
         (0, 1, model_event(2, ["user_activity:ctr_7d"]))],
    )  # fmt: skip
    out = json.loads(invoke(lake_settings, "features", "describe", "user_activity", "--json").stdout)
    assert (out["entity"], out["source"], out["ttl"], out["windows"]) == (
        "user_id",
        "clicks",
        "7d",
        ["5m", "1h", "24h", "7d"],
    )
    assert out["description"].startswith("Recent browsing of each user")
    assert out["consumers"] == [
        {
            "model_name": "ctr_model",
            "versions": [1, 2],
            "refs": ["user_activity:clicks_24h", "user_activity:ctr_7d"],
        }
    ]
    assert (out["offline"]["rows"], out["offline"]["backfilled"], out["offline"]["streamed"]) == (
        29_734,
        29_734,
        0,
    )

    # The oracle: the updates as the lake reader rebuilds them, summarised by pandas.
    updates = [
        r.record
        for r in LakeReader(lake_settings, SchemaCatalog.load(lake_settings.schemas_dir)).iter_records(
            "feature-updates"
        )
        if r.record["feature_set"] == "user_activity"
    ]
    lake = pd.DataFrame({"event_time": [u["event_time"] for u in updates]})
    values = pd.DataFrame([u["values"] for u in updates])
    features = {f["name"]: f for f in out["features"]}
    assert len(features) == 15
    for name in ("clicks_24h", "mean_position_24h", "best_clicked_position_7d"):
        column, got = values[name].astype(float), features[name]
        assert got["rows"] == len(values)
        assert got["missing_share"] == pytest.approx(column.isna().mean())
        assert got["mean"] == pytest.approx(column.mean()) and got["variance"] == pytest.approx(column.var())
    assert features["best_clicked_position_7d"]["missing_share"] > 0.4  # users who never clicked
    last_item = features["last_clicked_item_7d"]
    assert (last_item["type"], last_item["mean"], last_item["aggregation"]) == (
        "string",
        None,
        "last(item_id)",
    )
    assert features["ctr_24h"]["aggregation"].startswith("ratio(count where Eq('action', 'CLICK')")
    assert (
        features["clicks_24h"]["filter"] == "Eq('action', 'CLICK')"
        and features["clicks_24h"]["window"] == "24h"
    )
    span_h = (lake["event_time"].max() - lake["event_time"].min()) / 3_600_000
    assert features["clicks_24h"]["updates_per_hour"] == pytest.approx(len(values) / span_h)

    text = invoke(lake_settings, "features", "describe", "user_activity")
    assert text.exit_code == 0, text.output
    assert "consumers: ctr_model v1,2" in text.output and "29,734 updates of 296 entities" in text.output


def test_describe_before_any_data_and_without_consumers(lake_settings: Settings) -> None:
    result = invoke(lake_settings, "features", "describe", "item_activity")
    assert result.exit_code == 0, result.output
    assert "no updates yet" in result.output and "consumers: none" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["features", "describe", "users"],
            "unknown feature set 'users'; known: user_activity, item_activity",
        ),
        (["backfill", "users", "--start", START, "--end", END], "known: user_activity, item_activity"),
        (
            ["backfill", "user_activity", "--start", "24/11/2019", "--end", END],
            "write a UTC date like 2019-11-24",
        ),
        (
            ["backfill", "user_activity", "--start", END, "--end", START],
            "--end 2019-11-24 is not after --start",
        ),
        (["backfill", "user_activity", "--start", START, "--end", START], "not after"),
    ],
)
def test_bad_input_is_one_line_naming_what_is_known(
    lake_settings: Settings, args: list[str], message: str
) -> None:
    result = invoke(lake_settings, *args)
    assert result.exit_code != 0
    # The console entry point prints a HeadwaterError as one line: `headwater: error: <message>`.
    assert isinstance(result.exception, HeadwaterError) and message in str(result.exception)
    assert "\n" not in str(result.exception)


def test_times_are_utc_dates_or_iso_times() -> None:
    assert parse_time("2019-11-24", "--start") == 1_574_553_600_000
    assert parse_time("2019-11-24T06:00:00Z", "--start") == 1_574_553_600_000 + 6 * 3_600_000
    assert parse_time("2019-11-24T07:00+01:00", "--start") == 1_574_553_600_000 + 6 * 3_600_000
