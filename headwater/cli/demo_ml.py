"""The model half of `headwater demo`: the daily Dagster graph, then predictions over gRPC.

Kept apart from :mod:`headwater.cli.demo` (the event and feature half) so each module stays
one concern; the demo calls these steps in order after the history step.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.table import Table

from batch.assets import materialize_days
from headwater.cli.common import console, step
from headwater.errors import HeadwaterError
from headwater.settings import Settings
from models.spec import load_specs
from registry import Registry

__all__ = ["step_train"]


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")


def step_train(settings: Settings, events: list[tuple[str, dict[str, Any]]], n: int) -> bool:
    """Materialize the daily graph over the replayed week's complete days, as one backfill run.

    Returns whether models were trained (a short replay has no complete day to train on).
    """
    step(n, "Train, register and batch-score (Dagster)")
    clicks = [r["event_time"] for topic, r in events if topic == "clicks"]
    first = _day(min(clicks))
    last = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")  # the last complete day
    if last < first:
        console.print("skipped: the replayed events end within their first day (publish more with --limit)")
        return False
    start = time.perf_counter()
    result = materialize_days(settings, first, last, log_level="WARNING")
    seconds = time.perf_counter() - start
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    if not result.success or failed:
        why = "; ".join(f"{e.check_name}: {e.description}" for e in failed) or "see the run's log above"
        raise HeadwaterError(f"the daily run for {first}..{last} failed: {why}")
    meta = {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
        if e.asset_key is not None
    }
    checks = len(result.get_asset_check_evaluations())
    console.print(
        f"one Dagster run over the partitions {first}..{last}: {len(meta)} assets materialized, "
        f"{checks} data-quality checks passed, in {seconds:.1f}s"
    )
    raw, backfilled = meta.get("raw_clicks", {}), meta.get("feature_values", {})
    console.print(
        f"raw clicks compacted per day in the warehouse: {raw.get('rows', 0):,} events; "
        f"{backfilled.get('updates', 0):,} feature values backfilled in ClickHouse SQL into the offline "
        "and online stores (newer-wins: the streamed values stay)"
    )
    table = Table("model", "training rows", "holdout", "registered", "production", "batch predictions")
    specs = load_specs(settings)
    refusals: list[str] = []
    for spec in specs:
        training = meta.get(f"{spec.name}/training_set", {})
        evaluation = meta.get(f"{spec.name}/evaluation", {})
        registered = meta.get(f"{spec.name}/registered_model", {})
        predictions = meta.get(f"{spec.name}/batch_predictions", {})
        metric = spec.promotion_metric
        score = evaluation.get(f"candidate {metric}")
        if not registered.get("promoted"):
            refusals.append(str(registered.get("gate", "")))
        table.add_row(
            spec.name, f"{training.get('rows', 0):,} ({training.get('positives', 0)} clicks)",
            f"{metric} {score:.3f}" if isinstance(score, float) else "",
            f"v{registered.get('version', '')}", f"v{registered.get('production_version', '')}",
            f"{predictions.get('entities', 0):,} rows",
        )  # fmt: skip
    console.print(table)
    for refusal in refusals:
        console.print(f"gate: {refusal}")
    with Registry(settings, actor="demo") as registry:
        for spec in specs:
            production = registry.resolve(f"{spec.name}@production")
            console.print(
                f"registry (`models` topic): {spec.name}@production = version {production.version}, "
                f"artifact sha256 {production.artifact_sha256[:12]}… (skops, verified on load)"
            )
    console.print("inspect it with `headwater models list`, `headwater models lineage ctr_model`")
    return True
