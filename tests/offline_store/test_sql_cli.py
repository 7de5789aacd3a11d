"""`headwater sql`: the command function, mounted on a bare Typer app as the CLI will mount it."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from headwater.cli.sql import register
from headwater.settings import Settings
from processors.lake import LakeWriter
from tests.offline_store.conftest import T0, feature_update

QUERY = (
    "SELECT entity_key, `u:x` AS x, map('s', `u:s`) AS m, event_time FROM feature_updates ORDER BY event_time"
)


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Stands in for the real root callback, which puts the Settings in ctx.obj."""

    register(app)
    return app


def test_sql_prints_a_table_csv_and_json_lines(lake_settings: Settings, writer: LakeWriter) -> None:
    writer.write(
        "feature-updates",
        [(0, i, feature_update("u", f"e{i}", T0 + i, T0 + i, {"x": i, "s": "t"})) for i in range(3)],
    )
    runner = CliRunner()
    table = runner.invoke(_app(), ["sql", QUERY], obj=lake_settings)
    assert table.exit_code == 0, table.output
    assert "entity_key" in table.output and "3 rows" in table.output
    csv_out = runner.invoke(_app(), ["sql", QUERY, "--format", "csv"], obj=lake_settings)
    assert csv_out.output.splitlines() == [
        "entity_key,x,m,event_time",
        f'e0,0,"{{""s"": ""t""}}",{T0}',
        f'e1,1,"{{""s"": ""t""}}",{T0 + 1}',
        f'e2,2,"{{""s"": ""t""}}",{T0 + 2}',
    ]
    lines = runner.invoke(_app(), ["sql", QUERY, "-f", "json"], obj=lake_settings).output.splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"entity_key": "e0", "x": 0, "m": {"s": "t"}, "event_time": T0}


def test_sql_error_is_a_headwater_error(lake_settings: Settings) -> None:
    lake_settings.data_dir.mkdir(parents=True)  # a stack's data dir (`sql` refuses one that does not exist)
    result = CliRunner().invoke(_app(), ["sql", "SELECT * FROM nowhere"], obj=lake_settings)
    assert result.exit_code != 0
    assert "nowhere" in str(result.exception)
