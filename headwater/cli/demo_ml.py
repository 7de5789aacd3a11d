"""The model half of `headwater demo`: the daily Dagster graph, then predictions over gRPC.

Kept apart from :mod:`headwater.cli.demo` (the event and feature half) so each module stays
one concern; the demo calls these steps in order after the history step.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from rich.table import Table

from batch.assets import materialize_days
from headwater.cli.common import console, serde_for, step
from headwater.client import PredictionClient, PredictionError, PredictionResult
from headwater.errors import HeadwaterError
from headwater.settings import Settings
from infra.stack import serving_target
from models.spec import load_specs
from registry import Registry
from streams.consumer import EventConsumer

__all__ = ["step_serve", "step_train"]

MODEL = "ctr_model"  # the example spec the demo serves (models/examples/clickstream.py)


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
    # A short replay can cover a complete day with no click at all (it depends on the hour it
    # runs): the training set's label check would refuse it, rightly; say so instead of failing.
    positives = sum(
        1
        for topic, r in events
        if topic == "clicks" and r["action"] == "CLICK" and _day(r["event_time"]) <= last
    )
    if positives < settings.batch.min_positives:
        console.print(
            f"skipped: the complete days {first}..{last} of this replay hold {positives} clicks; a training "
            f"set needs at least {settings.batch.min_positives} (publish more with --limit)"
        )
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


def _first_answer(client: PredictionClient, entity: dict[str, Any], position: int, timeout_s: float) -> float:
    """Seconds until the service answers for the model: it follows the registry, no restart."""
    start = time.monotonic()
    while True:
        try:
            client.predict(MODEL, [entity], request_features={"position": position}, client_id="demo")
            return time.monotonic() - start
        except PredictionError as exc:
            if exc.code not in ("NOT_FOUND", "UNAVAILABLE") or time.monotonic() - start > timeout_s:
                raise HeadwaterError(f"the prediction service did not serve {MODEL}: {exc}") from exc
            time.sleep(0.2)


def step_serve(
    settings: Settings, events: list[tuple[str, dict[str, Any]]], n: int, timeout_s: float
) -> None:
    """Predictions over gRPC from the running service, and their events on the predictions topic."""
    step(n, "Predictions over gRPC")
    target = serving_target(settings)
    shown = [r for topic, r in events if topic == "clicks" and r["action"] == "IMPRESSION"][-200:]
    calls = [({"user_id": r["user_id"], "item_id": r["item_id"]}, int(r["position"])) for r in shown]
    items = sorted({r["item_id"] for t, r in events if t == "clicks"}, key=int)
    with PredictionClient(target) as client:
        waited = _first_answer(client, calls[0][0], calls[0][1], timeout_s)
        console.print(
            f"the service at {target} picked {MODEL}@production up from the registry ({waited:.1f}s)"
        )
        latencies, results = [], []
        for entity, position in calls:
            start = time.perf_counter()
            got = client.predict(MODEL, [entity], request_features={"position": position}, client_id="demo")
            latencies.append((time.perf_counter() - start) * 1000)
            results.append((entity, position, got[0]))
        p50, p99 = np.percentile(latencies, [50, 99])
        console.print(
            f"{len(calls)} single-entity calls (50 online features each, then the model): "
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms round trip from this process"
        )
        table = Table("user", "item", "slot", "P(click)", "version", "oldest feature", "defaulted")
        for entity, position, r in results[-5:]:
            table.add_row(
                entity["user_id"][:8], entity["item_id"], str(position), f"{r.score:.4f}",
                str(r.model_version), f"{(r.feature_age_ms or 0) / 1000:.0f}s",
                str(len(r.defaulted_features)),
            )  # fmt: skip
        console.print(table)
        user = calls[-1][0]["user_id"]
        start = time.perf_counter()
        ranked = client.predict(
            MODEL, [{"user_id": user, "item_id": i} for i in items], request_features={"position": 1},
            client_id="demo",
        )  # fmt: skip
        ms = (time.perf_counter() - start) * 1000
    top = _ranking(ranked)
    console.print(
        f"one call scoring all {len(items)} items for user {user[:8]} in {ms:.1f} ms; "
        f"the post stage ranks them: {', '.join(top)}"
    )
    logged = _count_predictions(settings, len(calls) + 1 + len(items), timeout_s)
    console.print(
        f"every decision is an event: {logged:,} prediction events on `predictions` (model version, "
        "its input row and the event time of each feature set read), logged without the call waiting "
        "for Kafka"
    )


def _ranking(results: list[PredictionResult]) -> list[str]:
    if results and results[0].ranked_items:
        return results[0].ranked_items
    return [r.prediction_id for r in sorted(results, key=lambda r: -(r.score or 0.0))][:10]


def _count_predictions(settings: Settings, expected: int, timeout_s: float) -> int:
    """Prediction events on the topic, read until ``expected`` arrived (the service sends them async)."""
    seen = 0
    deadline = time.monotonic() + timeout_s
    with EventConsumer(settings, serde_for(settings), ["predictions"], name="demo-predictions") as consumer:
        while seen < expected and time.monotonic() < deadline:
            seen += sum(
                1 for e in consumer.poll(max_records=5000, timeout_s=0.5) if e.record["model_name"] == MODEL
            )
    if seen < expected:
        raise HeadwaterError(
            f"only {seen:,} of {expected:,} prediction events arrived within {timeout_s:.0f}s"
        )
    return seen
