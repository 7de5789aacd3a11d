"""`headwater features list | describe NAME`, `headwater backfill | materialize FEATURE_SET --start --end`.

Discovery reads the definitions from the feature repository and the data about them from the
offline store, every figure computed by ClickHouse over ``feature_updates`` (streamed and
backfilled updates alike, of the feature set's current version, each update once: a copy a
replay left in the lake is not counted again): rows, entities, freshness
(the age of the newest value, by event time), last write, update frequency, and per feature
the missing share, mean and variance. Consumers are the models whose ``feature_refs`` in the
``models`` table name the feature set. Register with ``register(app)``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from batch.backfill import backfill as run_backfill
from batch.materialize import materialize as run_materialize
from batch.offline_store import OfflineStore, open_offline_store
from features.definitions import Aggregation, Feature, FeatureSet, Ratio
from features.predicates import sql_identifier, sql_literal
from features.windows import format_duration
from headwater.cli.common import console, require_data_dir, settings_of
from headwater.errors import ConfigError
from processors.worker import load_repository

__all__ = ["register"]

app = typer.Typer(
    help="Feature sets: what exists, what it means, how fresh and complete it is.", no_args_is_help=True
)
TABLE = "feature_updates"
HOUR_MS = 3_600_000


# --- ClickHouse: the figures ------------------------------------------------------------------


def _set_stats(store: OfflineStore, sets: list[FeatureSet]) -> dict[str, dict[str, Any]]:
    """Per feature set (current version): updates, entities, sources, first/last event and write times."""
    if not sets:
        return {}
    versions = ", ".join(f"({sql_literal(fs.name)}, {fs.version})" for fs in sets)
    result = store.query(
        f"""SELECT feature_set, count() AS rows, uniqExact(entity_key) AS entities,
                   countIf(source = 'STREAM') AS streamed, countIf(source = 'BACKFILL') AS backfilled,
                   min(event_time) AS first_event, max(event_time) AS last_event,
                   max(write_time) AS last_write
            FROM {TABLE} WHERE (feature_set, feature_set_version) IN ({versions})
            GROUP BY feature_set"""
    )
    return {row["feature_set"]: row for row in result.to_pylist()}


def _feature_stats(store: OfflineStore, fs: FeatureSet) -> dict[str, dict[str, Any]]:
    """Per feature: rows, missing, mean and variance (numeric), last update, updates per hour."""
    available = store.extra_columns(TABLE)
    present = [f for f in fs.features if f"{fs.name}:{f.name}" in available]
    if not present:
        return {}
    selects = ["count() AS rows"]
    for i, f in enumerate(present):
        c = sql_identifier(f"{fs.name}:{f.name}")
        selects += [
            f"countIf(isNull({c})) AS missing_{i}",
            f"maxIf(write_time, isNotNull({c})) AS last_write_{i}",
            f"maxIf(event_time, isNotNull({c})) AS last_event_{i}",
            f"countIf(isNotNull({c})) / greatest(1, maxIf(event_time, isNotNull({c})) "
            f"- minIf(event_time, isNotNull({c}))) * {HOUR_MS} AS per_hour_{i}",
        ]
        if f.dtype != "string":
            selects += [f"avg({c}) AS mean_{i}", f"varSampOrNull({c}) AS variance_{i}"]
    relation = store.relation(
        TABLE, {f"{fs.name}:{f.name}": available[f"{fs.name}:{f.name}"] for f in present}
    )
    (row,) = store.query(
        f"SELECT {', '.join(selects)} FROM {relation} "
        f"WHERE feature_set = {sql_literal(fs.name)} AND feature_set_version = {fs.version}"
    ).to_pylist()
    out: dict[str, dict[str, Any]] = {}
    for i, f in enumerate(present):
        has = row["rows"] - row[f"missing_{i}"] > 0
        out[f.name] = {
            "rows": row["rows"],
            "missing_share": row[f"missing_{i}"] / row["rows"] if row["rows"] else None,
            "mean": row.get(f"mean_{i}"),
            "variance": row.get(f"variance_{i}"),
            "last_write": row[f"last_write_{i}"] if has else None,
            "last_event": row[f"last_event_{i}"] if has else None,
            "updates_per_hour": row[f"per_hour_{i}"] if has else None,
        }
    return out


def _consumers(store: OfflineStore, fs: FeatureSet) -> list[dict[str, Any]]:
    """Models whose registered versions read features of ``fs``, with the refs they use."""
    prefix = sql_literal(f"{fs.name}:")
    result = store.query(
        f"""SELECT model_name, arraySort(groupUniqArray(version)) AS versions,
                   arraySort(groupUniqArrayArray(used)) AS refs
            FROM (SELECT model_name, version, arrayFilter(r -> startsWith(r, {prefix}), feature_refs) AS used
                  FROM models)
            WHERE notEmpty(used) GROUP BY model_name ORDER BY model_name"""
    )
    consumers: list[dict[str, Any]] = result.to_pylist()
    return consumers


# --- rendering ----------------------------------------------------------------------------------


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(now_ms: int, ms: int | None) -> str:
    """A compact age: 45s, 12m, 3h, 2d (days beyond two days)."""
    if ms is None:
        return "-"
    s = max(0, now_ms - ms) // 1000
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if s >= size * (2 if unit == "d" else 1):
            return f"{s // size}{unit}"
    return f"{s}s"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _aggregation(f: Feature) -> str:
    agg = f.aggregation
    if isinstance(agg, Ratio):  # its parts carry their own filters
        return f"ratio({_part(agg.numerator)} / {_part(agg.denominator)})"
    return f"{agg.kind}({agg.field})" if agg.field else agg.kind


def _part(agg: Aggregation) -> str:
    text = f"{agg.kind}({agg.field})" if agg.field else agg.kind
    return f"{text} where {agg.where!r}" if agg.where is not None else text


def _filter(f: Feature) -> str:
    agg = f.aggregation
    return "-" if isinstance(agg, Ratio) or agg.where is None else repr(agg.where)


def _windows(fs: FeatureSet) -> list[str]:
    """The windows as declared (``24h``, not ``1d``), shortest first."""
    spelled: dict[int, str] = {}
    for f in fs.features:
        spelled.setdefault(f.window_ms, f.window)
    return [spelled[ms] for ms in sorted(spelled)]


def _emit_json(value: Mapping[str, Any] | list[Any]) -> None:
    sys.stdout.write(json.dumps(value, default=str, indent=1) + "\n")


# --- commands -----------------------------------------------------------------------------------


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the feature sets: entity, source, owner, features, offline rows, last update, freshness."""
    settings = settings_of(ctx)
    sets = load_repository(settings).feature_sets
    now = time.time_ns() // 1_000_000
    with open_offline_store(require_data_dir(settings)) as store:
        store.refresh()
        stats = _set_stats(store, sets)
    rows = []
    for fs in sets:
        s = stats.get(fs.name, {})
        rows.append(
            {
                "name": fs.name, "version": fs.version, "entity": fs.entity, "source": fs.source,
                "owner": fs.owner, "features": len(fs.features), "rows": s.get("rows", 0),
                "entities": s.get("entities", 0), "last_update": _when(s.get("last_write")),
                "freshness": _age(now, s.get("last_event")),
            }
        )  # fmt: skip
    if as_json:
        _emit_json(rows)
        return
    table = Table(
        Column("feature set", no_wrap=True), "entity", "source", Column("owner", overflow="fold"),
        "features", Column("rows", no_wrap=True), "last update", Column("freshness", no_wrap=True),
    )  # fmt: skip
    for r in rows:
        table.add_row(
            f"{r['name']} v{r['version']}", r["entity"], r["source"], r["owner"], str(r["features"]),
            f"{r['rows']:,}", r["last_update"], r["freshness"],
        )  # fmt: skip
    console.print(table)
    console.print("freshness: age of the newest value (now - its event time)", style="dim")


@app.command("describe")
def describe(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Feature set name (see `headwater features list`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a feature set: definition, consumers, and per feature its data in the offline store."""
    settings = settings_of(ctx)
    fs = load_repository(settings).feature_set(name)  # NotFoundError lists the known ones
    now = time.time_ns() // 1_000_000
    with open_offline_store(require_data_dir(settings)) as store:
        store.refresh()
        totals = _set_stats(store, [fs]).get(fs.name, {})
        per_feature = _feature_stats(store, fs)
        consumers = _consumers(store, fs)
    span_h = max(1, (totals.get("last_event") or 0) - (totals.get("first_event") or 0)) / HOUR_MS
    features = [
        {
            "name": f.name, "aggregation": _aggregation(f), "window": f.window, "filter": _filter(f),
            "type": f.dtype, **per_feature.get(f.name, {"rows": 0}),
        }
        for f in fs.features
    ]  # fmt: skip
    if as_json:
        definition = {
            "name": fs.name, "version": fs.version, "entity": fs.entity, "source": fs.source,
            "owner": fs.owner, "description": fs.description, "ttl": format_duration(fs.ttl_ms),
            "lateness": format_duration(fs.lateness_ms),
            "windows": _windows(fs),
        }  # fmt: skip
        _emit_json({**definition, "offline": totals, "consumers": consumers, "features": features})
        return
    windows = ", ".join(_windows(fs))
    console.print(f"[bold]{fs.name}[/bold] v{fs.version}: {fs.description}", soft_wrap=True)
    console.print(
        f"  entity {fs.entity}, source topic {fs.source} ({fs.event_type} events), owner {fs.owner}"
    )
    console.print(
        f"  windows {windows}; TTL {format_duration(fs.ttl_ms)} by event time; lateness "
        f"{format_duration(fs.lateness_ms)}"
    )
    used = "; ".join(
        f"{c['model_name']} v{','.join(map(str, c['versions']))} ({', '.join(c['refs'])})" for c in consumers
    )
    console.print(f"  consumers: {used or 'none (no registered model reads it)'}", soft_wrap=True)
    if totals:
        console.print(
            f"  offline store: {totals['rows']:,} updates of {totals['entities']:,} entities "
            f"({totals['streamed']:,} streamed, {totals['backfilled']:,} backfilled), event times "
            f"{_when(totals['first_event'])} .. {_when(totals['last_event'])}, "
            f"{totals['rows'] / span_h:,.1f} updates/h; last written {_when(totals['last_write'])}; "
            f"freshness {_age(now, totals['last_event'])}",
            soft_wrap=True,
        )
    else:
        console.print("  offline store: no updates yet (run the processors, or `headwater backfill`)")
    table = Table(
        Column("feature", no_wrap=True), "aggregation", "window", "filter", "type",
        Column("rows", no_wrap=True), "missing", "mean", "variance", "last update", "updates/h",
    )  # fmt: skip
    for f in features:
        missing = f.get("missing_share")
        table.add_row(
            f["name"], f["aggregation"], f["window"], f["filter"], f["type"], f"{f['rows']:,}",
            "-" if missing is None else f"{missing:.1%}", _number(f.get("mean")), _number(f.get("variance")),
            _when(f.get("last_write")), _number(f.get("updates_per_hour")),
        )  # fmt: skip
    console.print(table)


def parse_time(text: str, option: str) -> int:
    """``2019-11-24`` or ``2019-11-24T06:00[:00][Z|+01:00]`` as epoch ms; naive times are UTC."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"bad {option} {text!r}: write a UTC date like 2019-11-24 or a time like 2019-11-24T06:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    ms = int(parsed.timestamp() * 1000)
    if ms < 0:
        raise ConfigError(f"bad {option} {text!r}: times before 1970 are not supported")
    return ms


def backfill(
    ctx: typer.Context,
    feature_set: Annotated[
        str, typer.Argument(help="Feature set to backfill (see `headwater features list`).")
    ],
    start: Annotated[
        str, typer.Option("--start", help="First day or time, inclusive (UTC), e.g. 2019-11-24.")
    ],
    end: Annotated[str, typer.Option("--end", help="End day or time, exclusive (UTC), e.g. 2019-12-01.")],
    online: Annotated[
        bool, typer.Option("--online/--no-online", help="Also write each entity's latest values online.")
    ] = True,
) -> None:
    """Compute a feature set over a past range from raw events into the offline (and online) store."""
    settings = settings_of(ctx)
    repository = load_repository(settings)
    fs = repository.feature_set(feature_set)  # NotFoundError lists the known ones
    start_ms, end_ms = parse_time(start, "--start"), parse_time(end, "--end")
    if end_ms <= start_ms:
        raise ConfigError(f"--end {end} is not after --start {start}: give a non-empty range")
    result = run_backfill(settings, fs.name, start_ms, end_ms, online=online, repository=repository)
    console.print(
        f"backfilled {fs.name} v{fs.version} over [{_when(start_ms)}, {_when(end_ms)}): "
        f"{result.updates:,} updates of {result.entities:,} entities"
    )
    console.print(f"  ClickHouse SQL: {result.sql_s:.2f} s")
    console.print(
        f"  offline store: {result.updates:,} updates (source BACKFILL) in {len(result.lake_files)} lake "
        f"files, {result.lake_s:.2f} s"
    )
    if online:
        expired = (
            f"; {result.online_expired:,} of them already past the {format_duration(fs.ttl_ms)} TTL"
            if result.online_expired
            else ""
        )
        console.print(
            f"  online store: {result.online_written:,} of {result.entities:,} entities written "
            f"(newer-wins: newer values kept){expired}, {result.online_s:.2f} s"
        )
    console.print(f"  total {result.total_s:.2f} s")


def materialize(
    ctx: typer.Context,
    feature_set: Annotated[str, typer.Argument(help="Feature set to copy online.")],
    start: Annotated[str, typer.Option("--start", help="First day or time of event time (UTC).")],
    end: Annotated[str, typer.Option("--end", help="End day or time, exclusive (UTC).")],
) -> None:
    """Copy each entity's latest offline values in a range into the online store (newer-wins)."""
    settings = settings_of(ctx)
    start_ms, end_ms = parse_time(start, "--start"), parse_time(end, "--end")
    if end_ms <= start_ms:
        raise ConfigError(f"--end {end} is not after --start {start}: give a non-empty range")
    result = run_materialize(settings, load_repository(settings), feature_set, start_ms, end_ms)
    console.print(
        f"materialized {result.feature_set} over [{_when(start_ms)}, {_when(end_ms)}): "
        f"{result.written:,} of {result.entities:,} entities written online (newer-wins), "
        f"read {result.read_s:.2f} s, write {result.write_s:.2f} s"
    )


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="features")
    root.command("backfill")(backfill)
    root.command("materialize")(materialize)
