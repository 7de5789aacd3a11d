"""`headwater sql "SELECT ..."`: ClickHouse SQL on the offline store, printed as a table, CSV or JSON lines.

Tables are named like topics with underscores (``clicks``, ``feature_updates``); see
:mod:`batch.offline_store`. Register with ``register(app)`` or ``app.command("sql")(sql)``.
"""

from __future__ import annotations

import csv
import enum
import sys
from typing import Annotated, Any

import pyarrow as pa
import typer
from rich.table import Table

from batch.offline_store import open_offline_store
from headwater.cli.common import console, require_data_dir, settings_of, to_json

__all__ = ["OutputFormat", "register", "sql"]


class OutputFormat(enum.StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _plain(value: Any) -> Any:
    """JSON-friendly value: Arrow maps (lists of pairs) become objects."""
    if isinstance(value, list):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {str(k): _plain(v) for k, v in value}
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _cell(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return "NULL"
    if isinstance(value, dict | list):
        return to_json(value)
    return str(value)


def print_result(result: pa.Table, fmt: OutputFormat) -> None:
    rows = result.to_pylist()
    if fmt is OutputFormat.json:
        for row in rows:
            sys.stdout.write(to_json({k: _plain(v) for k, v in row.items()}) + "\n")
    elif fmt is OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(result.column_names)
        for row in rows:
            writer.writerow("" if v is None else _cell(v) for v in row.values())
    else:
        table = Table(*result.column_names)
        for row in rows:
            table.add_row(*(_cell(v) for v in row.values()))
        console.print(table)
        console.print(f"{result.num_rows} row{'s' if result.num_rows != 1 else ''}", style="dim")
    sys.stdout.flush()


def sql(
    ctx: typer.Context,
    query: Annotated[
        str, typer.Argument(help="ClickHouse SQL; tables are topics with underscores (clicks, ...).")
    ],
    format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table, csv or json (one object per line).")
    ] = OutputFormat.table,
) -> None:
    """Run ClickHouse SQL on the offline store (the lake, or a ClickHouse server) and print the result."""
    with open_offline_store(require_data_dir(settings_of(ctx))) as store:
        store.refresh()
        print_result(store.query(query), format)


def register(app: typer.Typer) -> None:
    app.command("sql")(sql)
