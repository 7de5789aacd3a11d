"""`headwater doctor`: is the data at rest what the platform wrote? Exit code 1 if not.

Each store checks itself where its format lives; this command runs the checks and prints them:
the lake against its manifest (:func:`processors.lake.check_lake`), the online store
(:meth:`serving.online_store.OnlineStore.check`), the processors' state stores
(:func:`processors.state_store.check_state_stores`), and every registered model's artifact and
holdout against the sha256 the registry recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.markup import escape

from headwater.cli.common import console, require_data_dir, settings_of
from headwater.errors import HeadwaterError, NotFoundError
from headwater.integrity import CheckReport
from headwater.settings import Settings

__all__ = ["register"]


def _online_store(settings: Settings) -> CheckReport:
    from serving.online_store import open_online_store

    if settings.online_store.type == "lmdb" and not (settings.online_store_path / "data.mdb").exists():
        report = CheckReport(f"online store (LMDB at {settings.online_store_path})")
        report.warning(str(settings.online_store_path), "no online store here yet (nothing written)")
        return report
    with open_online_store(settings) as store:
        return store.check()


def _registry(settings: Settings) -> CheckReport:
    """Every version's artifact and holdout, verified. The registry is read from the broker when one
    runs, else from the lake's archive of the models topic (the stack may be down)."""
    from processors.lake import LakeReader
    from registry import ArtifactIntegrityError, Registry, RegistryState, open_artifact_store
    from streams.broker import resolve_bootstrap
    from streams.catalog import SchemaCatalog

    try:
        resolve_bootstrap(settings)
        with Registry(settings) as registry:
            versions, source = registry.state.all_versions(), "the models topic"
    except HeadwaterError:
        records = LakeReader(settings, SchemaCatalog.load(settings.schemas_dir)).iter_records("models")
        versions = RegistryState(r.record for r in records).all_versions()
        source = "the lake's archive of the models topic (no broker)"
    report = CheckReport(f"registry artifacts ({settings.artifact_store_url})")
    store = open_artifact_store(settings)
    blobs = 0
    for mv in versions:
        holdout = (mv.metadata.get("holdout_uri"), mv.metadata.get("holdout_sha256"))
        for what, (uri, sha256) in (
            ("artifact", (mv.artifact_uri, mv.artifact_sha256)),
            ("holdout", holdout),
        ):
            if not uri or not sha256:
                continue
            blobs += 1
            try:
                store.get(str(uri), str(sha256))
            except NotFoundError:
                report.error(f"{mv.ref} {what}", f"missing: nothing at {uri}")
            except ArtifactIntegrityError as exc:
                report.error(f"{mv.ref} {what}", str(exc))
    report.checked = f"{len(versions)} versions, {blobs} blobs verified (registry read from {source})"
    return report


def _print(report: CheckReport) -> None:
    # Paths, keys and messages are text, not markup (a key may hold "[").
    verdict = (
        "[green]ok[/]" if not report.findings else "[red]FAILED[/]" if report.errors else "[yellow]ok[/]"
    )
    console.print(
        f"{escape(report.name)}: {escape(report.checked)} — {verdict}", soft_wrap=True, highlight=False
    )
    for f in report.findings:
        label = "[red]ERROR[/]" if f.severity == "error" else "[yellow]warning[/]"
        console.print(f"  {label} {escape(f.where)}: {escape(f.message)}", soft_wrap=True, highlight=False)
    if report.errors and report.advice:
        console.print(f"  what to do: {escape(report.advice)}", soft_wrap=True, highlight=False)


def doctor(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="Lake: sizes and Parquet footers only, not every file's sha256.")
    ] = False,
    adopt: Annotated[
        bool,
        typer.Option(
            "--adopt", help="Record readable lake files the manifest lacks (a lake from before it)."
        ),
    ] = False,
) -> None:
    """Check the data at rest: lake files, online store, processor state, model artifacts.

    Prints what each check read and found; exit code 1 if anything is lost, changed or unreadable.
    """
    from processors.lake import check_lake
    from processors.state_store import check_state_stores

    settings = require_data_dir(settings_of(ctx))
    checks: list[Callable[[], CheckReport]] = [
        lambda: check_lake(settings.lake_dir, verify_content=not quick, adopt=adopt),
        lambda: _online_store(settings),
        lambda: check_state_stores(settings.data_dir / "state"),
        lambda: _registry(settings),
    ]
    errors = warnings = 0
    for check in checks:
        report = check()
        _print(report)
        errors += len(report.errors)
        warnings += len(report.warnings)
    console.print(f"doctor: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}")
    if errors:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
