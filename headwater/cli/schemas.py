"""`headwater schemas list | check`: the Avro event catalog and its compatibility rules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headwater.cli.common import console, settings_of
from streams.catalog import SchemaCatalog
from streams.compat import check_catalog

__all__ = ["register"]

app = typer.Typer(help="The Avro event catalog: list it, check its history.", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """Every event type with each version and its CRC-64-AVRO fingerprint (as written on the wire)."""
    catalog = SchemaCatalog.load(settings_of(ctx).schemas_dir)
    table = Table("event type", "version", "fingerprint", "fields", "")
    for event_type in catalog.event_types:
        versions = catalog.versions(event_type)
        for sv in versions:
            latest = "latest" if sv is versions[-1] else ""
            table.add_row(
                event_type, f"v{sv.version}", sv.fingerprint.hex(), str(len(sv.raw["fields"])), latest
            )
    console.print(table)


@app.command("check")
def check(
    ctx: typer.Context,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Schema folder to check (default: the configured schemas_dir).",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Reject schema histories that old or new readers could not read (exit code 1)."""
    folder = directory or settings_of(ctx).schemas_dir
    catalog = SchemaCatalog.load(folder)
    count = sum(1 for _ in catalog)
    problems = check_catalog(catalog)
    if not problems:
        console.print(f"{count} schemas, all compatible ({folder})")
        return
    for problem in problems:
        console.print(str(problem), soft_wrap=True, markup=False)
    console.print(f"{count} schemas, {len(problems)} incompatible pairs ({folder})")
    raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="schemas")
