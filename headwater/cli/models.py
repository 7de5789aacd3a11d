"""`headwater models list | show | promote | rollback | archive | lineage`: the model registry.

Every command reads the registry from the compacted ``models`` topic (so it needs the
broker: `headwater up`); changes are events on that topic, visible to serving within
seconds. ``promote`` runs the promotion gate: the candidate is scored against the current
version of the alias on the candidate's holdout (:func:`registry.holdout_evaluator`);
``--force --reason`` skips the gate and is recorded. Register with ``register(app)``.
"""

from __future__ import annotations

import enum
import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from headwater.cli.common import console, settings_of, to_json
from headwater.errors import ConfigError
from registry import ModelVersion, Registry, RegistryState, holdout_evaluator, parse_ref
from registry.state import DEFAULT_ALIAS

__all__ = ["OutputFormat", "register"]

app = typer.Typer(
    help="Model registry: versions, aliases, promotion with a gate, rollback, lineage.", no_args_is_help=True
)


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"


FormatOption = Annotated[OutputFormat, typer.Option("--format", help="table or json.")]
AliasOption = Annotated[str, typer.Option("--alias", help="Alias to move.")]


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _emit(value: Any) -> None:
    sys.stdout.write(to_json(value) + "\n")


def _registry(ctx: typer.Context) -> Registry:
    return Registry(settings_of(ctx), actor="cli")


def _version_dict(state: RegistryState, mv: ModelVersion) -> dict[str, Any]:
    return {
        "name": mv.name,
        "version": mv.version,
        "aliases": state.aliases_of(mv.name, mv.version),
        "archived": mv.archived,
        "registered_at": mv.registered_at,
        "actor": mv.actor,
        "artifact_uri": mv.artifact_uri,
        "artifact_sha256": mv.artifact_sha256,
        "feature_refs": mv.feature_refs,
        "metrics": mv.metrics,
        "metadata": mv.metadata,
    }


def _aliases_text(aliases: dict[str, int]) -> str:
    return ", ".join(f"{a}→{v}" for a, v in aliases.items()) or "-"


@app.command("list")
def list_(ctx: typer.Context, fmt: FormatOption = OutputFormat.table) -> None:
    """List the registered models: versions, aliases, shadows, owner, last registration."""
    with _registry(ctx) as registry, registry.view() as state:
        rows: list[dict[str, Any]] = []
        for name in state.models():
            versions = state.versions(name)
            latest = versions[-1] if versions else None
            rows.append(
                {
                    "name": name,
                    "versions": [v.version for v in versions],
                    "archived": [v.version for v in versions if v.archived],
                    "aliases": state.aliases(name),
                    "shadows": state.all_shadows(name),
                    "owner": (latest.metadata.get("owner") if latest else None) or "",
                    "last_registered": latest.registered_at if latest else None,
                }
            )
    if fmt is OutputFormat.json:
        _emit(rows)
        return
    table = Table(Column("model", no_wrap=True), "versions", "aliases", "shadows", "owner", "last registered")
    for r in rows:
        archived = f" ({len(r['archived'])} archived)" if r["archived"] else ""
        shadows = "; ".join(f"{a}: {', '.join(map(str, vs))}" for a, vs in r["shadows"].items()) or "-"
        table.add_row(
            r["name"], f"{len(r['versions'])}{archived}", _aliases_text(r["aliases"]), shadows,
            r["owner"], _when(r["last_registered"]),
        )  # fmt: skip
    console.print(table if rows else "no models registered yet")


@app.command("show")
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME (= NAME@production), NAME@ALIAS or NAME:VERSION.")],
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Show one version: artifact, aliases, metrics, features, training metadata, alias history."""
    with _registry(ctx) as registry, registry.view() as state:
        mv = state.resolve(ref)
        info = _version_dict(state, mv)
        history: dict[str, list[dict[str, Any]]] = {
            alias: [
                {
                    "version": m.version, "previous_version": m.previous_version, "time": m.event_time,
                    "actor": m.actor, "reason": m.reason, "forced": m.forced, "rollback": m.rollback,
                }
                for m in state.alias_history(mv.name, alias)
            ]
            for alias in state.aliases(mv.name)
        }  # fmt: skip
        shadows = state.all_shadows(mv.name)
    if fmt is OutputFormat.json:
        _emit({**info, "alias_history": history, "shadows": shadows})
        return
    meta = mv.metadata
    state_text = "archived" if mv.archived else "active"
    console.print(f"[bold]{mv.ref}[/bold] ({state_text}) aliases: {', '.join(info['aliases']) or '-'}")
    console.print(f"  registered {_when(mv.registered_at)} by {mv.actor or '-'}")
    console.print(f"  artifact {mv.artifact_uri}\n  sha256 {mv.artifact_sha256}", soft_wrap=True)
    for key in ("owner", "contact", "description", "consumers", "code_version"):
        if meta.get(key):
            value = meta[key]
            console.print(
                f"  {key}: {', '.join(value) if isinstance(value, list) else value}", soft_wrap=True
            )
    if meta.get("training_data"):
        console.print(f"  training data: {json.dumps(meta['training_data'], sort_keys=True)}", soft_wrap=True)
    if meta.get("params"):
        console.print(f"  params: {json.dumps(meta['params'], sort_keys=True)}", soft_wrap=True)
    console.print(f"  features: {', '.join(mv.feature_refs) or '-'}", soft_wrap=True)
    metrics = Table("metric", "value")
    for k, v in sorted(mv.metrics.items()):
        metrics.add_row(k, f"{v:.6g}")
    if mv.metrics:
        console.print(metrics)
    moves = Table("alias", "version", "from", "when", "actor", "reason", "forced")
    for alias, entries in history.items():
        for e in entries:
            kind = " (rollback)" if e["rollback"] else ""
            moves.add_row(
                alias, f"{e['version']}{kind}", str(e["previous_version"] or "-"), _when(e["time"]),
                e["actor"], e["reason"] or "-", "yes" if e["forced"] else "",
            )  # fmt: skip
    if history:
        console.print(moves)
    if shadows:
        console.print("  shadows: " + "; ".join(f"{a}: {', '.join(map(str, v))}" for a, v in shadows.items()))


@app.command("promote")
def promote(  # noqa: PLR0917 - typer maps parameters to arguments and options
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version to promote.", min=1)],
    alias: AliasOption = DEFAULT_ALIAS,
    force: Annotated[bool, typer.Option("--force", help="Skip the gate (needs --reason; recorded).")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why; required with --force.")] = None,
) -> None:
    """Move an alias to a version if it beats the current one on the candidate's holdout."""
    settings = settings_of(ctx)
    with Registry(settings, actor="cli") as registry:
        evaluator = None
        if not force:
            from processors.worker import load_repository  # only the gate needs the feature definitions

            evaluator = holdout_evaluator(registry, load_repository(settings))
        with registry.view() as state:
            previous = state.alias(name, alias)
        mv = registry.promote(name, version, alias, evaluator=evaluator, force=force, reason=reason)
        with registry.view() as state:
            move = state.alias_history(name, alias)[-1]
    was = f" (was version {previous})" if previous is not None else ""
    console.print(f"promoted {mv.ref} to {name}@{alias}{was}", soft_wrap=True)
    if move.forced:
        console.print(f"  forced: {move.reason}", soft_wrap=True)
    elif isinstance(move.metadata.get("gate"), dict):
        console.print(f"  gate: {move.metadata['gate'].get('message')}", soft_wrap=True)


@app.command("rollback")
def rollback(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the registry event).")],
    alias: AliasOption = DEFAULT_ALIAS,
) -> None:
    """Move an alias back to the version it pointed at before. Instant; no gate."""
    with _registry(ctx) as registry:
        with registry.view() as state:
            current = state.alias(name, alias)
        mv = registry.rollback(name, alias, reason=reason)
    console.print(f"rolled back {name}@{alias} from version {current} to version {mv.version}")


@app.command("archive")
def archive(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version to archive.", min=1)],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (recorded).")] = None,
) -> None:
    """Archive a version: it can no longer be promoted. Refused while an alias points at it."""
    with _registry(ctx) as registry:
        mv = registry.archive(name, version, reason=reason)
    console.print(f"archived {mv.ref}")


@app.command("lineage")
def lineage(
    ctx: typer.Context,
    ref: Annotated[
        str | None, typer.Argument(help="NAME[:VERSION]: what it was trained on, who consumes it.")
    ] = None,
    feature: Annotated[
        str | None, typer.Option("--feature", help="Feature ref (set:feature) or set: which versions use it.")
    ] = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Lineage: the versions using a feature, or what a version was trained on and who consumes it."""
    if (ref is None) == (feature is None):
        raise ConfigError("give either --feature REF or a model NAME[:VERSION], not both or neither")
    with _registry(ctx) as registry:
        if feature is not None:
            with registry.view() as state:
                rows: list[dict[str, Any]] = [
                    {
                        "model": mv.ref, "aliases": state.aliases_of(mv.name, mv.version),
                        "archived": mv.archived,
                        "uses": [r for r in mv.feature_refs if r == feature or r.startswith(f"{feature}:")],
                    }
                    for mv in registry.versions_using(feature)
                ]  # fmt: skip
            if fmt is OutputFormat.json:
                _emit(rows)
                return
            table = Table(Column("model", no_wrap=True), "aliases", "archived", "uses")
            for r in rows:
                table.add_row(
                    r["model"],
                    ", ".join(r["aliases"]) or "-",
                    "yes" if r["archived"] else "",
                    ", ".join(r["uses"]),
                )
            console.print(table if rows else f"no registered version uses {feature}")
            return
        assert ref is not None
        name, alias, version = parse_ref(ref)
        if version is None:
            with registry.view() as state:
                # A bare name: the production version, else the latest one.
                pointed = state.alias(name, alias or DEFAULT_ALIAS) if "@" in ref else None
                version = pointed or state.alias(name, DEFAULT_ALIAS) or state.versions(name)[-1].version
        trained = registry.trained_on(name, version)
        consumers = registry.consumers(name)
    result = {**trained, "consumers": consumers}
    if fmt is OutputFormat.json:
        _emit(result)
        return
    console.print(f"[bold]{trained['model']}[/bold]")
    data = trained.get("training_data") or {}
    if data:
        rng = f"{_when(data.get('start_ms'))} .. {_when(data.get('end_ms'))}"
        console.print(
            f"  trained on: {data.get('rows', '?')} rows, {rng}, data hash {data.get('data_hash', '-')}"
        )
        if data.get("query"):
            console.print(f"  query: {data['query']}", soft_wrap=True)
    else:
        console.print("  trained on: no training data reference in its metadata")
    console.print(f"  code version: {trained.get('code_version') or '-'}")
    console.print(f"  features: {', '.join(trained['feature_refs']) or '-'}", soft_wrap=True)
    console.print(f"  consumers: {', '.join(consumers) or 'none declared or seen'}", soft_wrap=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="models")
