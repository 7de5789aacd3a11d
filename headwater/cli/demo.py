"""`headwater demo`: the platform's main job end to end on embedded defaults (`make demo`).

A sequence of separate steps, each a function printing its own section: start the stack,
load the real clickstream (the Open Bandit Dataset sample), publish it, consume it back,
stop what was started. Later capabilities (feature processors, the lake, training,
serving) join as further steps between publishing and stopping.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import pandas as pd
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batch.offline_store import open_offline_store
from headwater.cli.common import console, serde_for, settings_of, step, to_json
from headwater.errors import HeadwaterError
from headwater.sample_data import CAMPAIGNS, merged_events, retimed
from headwater.sdk import FeatureStore
from headwater.settings import Settings
from infra.stack import Stack, start_stack, stop_services, stop_stack
from processors.worker import load_repository
from serving.online_store import open_online_store
from streams.consumer import Event, EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde

__all__ = ["register"]

RUN_HEADER = "demo_run"  # events of this run carry its id, so earlier runs on a running broker are told apart
Kind = tuple[str, str, str]  # (topic, event type, action or outcome type)


@dataclass
class Published:
    count: Counter[Kind] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.count.values())


@dataclass
class Arrived:
    count: Counter[Kind] = field(default_factory=Counter)
    event_ids: set[str] = field(default_factory=set)
    samples: dict[Kind, Event] = field(default_factory=dict)
    earlier_runs: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.count.values())


def _kind(topic: str, event_type: str, record: dict[str, Any]) -> Kind:
    return topic, event_type, str(record.get("action") or record.get("outcome_type") or "")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )  # fmt: skip


def step_start_stack(settings: Settings) -> Stack:
    step(1, "Start the stack")
    stack = start_stack(settings)
    if stack.broker_pid is None:
        console.print(f"Kafka: external cluster at [bold]{stack.bootstrap}[/]")
    else:
        verb = "started" if stack.started else "already running"
        console.print(
            f"Kafka: embedded Tansu broker {verb} (pid {stack.broker_pid}) at [bold]{stack.bootstrap}[/]"
        )
    console.print(f"topics: {stack.topics_created} created, {stack.topics_existing} already there")
    return stack


def step_load_clickstream(
    campaigns: list[str], limit: int | None, run_id: str
) -> list[tuple[str, dict[str, Any]]]:
    step(2, "Load the clickstream")
    events: list[tuple[str, dict[str, Any]]] = []
    for event in merged_events(campaigns):
        if limit is not None and len(events) >= limit:
            break
        events.append(event)
    if not events:
        raise HeadwaterError("the sample clickstream is empty")
    original_end = events[-1][1]["event_time"]
    # Replayed as today's traffic: the week ends now (feature TTLs are by event time).
    events = retimed(events, int(time.time() * 1000), run_id)
    shift_days = (events[-1][1]["event_time"] - original_end) / 86_400_000
    kinds = Counter(_kind(topic, "", record)[2] for topic, record in events)
    users = {r["user_id"] for t, r in events if t == "clicks"}
    first, last = (datetime.fromtimestamp(events[i][1]["event_time"] / 1000, UTC) for i in (0, -1))
    # (the dates printed are the dataset's own; the replay below moves them)
    console.print(
        f"Open Bandit Dataset (ZOZOTOWN, uniform-random policy), campaigns {', '.join(campaigns)}: "
        f"{len(events):,} events from {first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC"
    )
    console.print(
        f"{kinds['IMPRESSION']:,} impressions, {kinds['CLICK']:,} clicks, {kinds['click']:,} click outcomes, "
        f"{len(users):,} user profiles"
    )
    console.print(f"replayed as live traffic: event times moved {shift_days:,.0f} days forward to end now")
    return events


def step_publish(
    settings: Settings, serde: Serde, events: list[tuple[str, dict[str, Any]]], run_id: str
) -> Published:
    step(3, "Publish")
    published = Published()
    start = time.perf_counter()
    with _progress() as progress, EventProducer(settings, serde, client_id="headwater-demo") as producer:
        task = progress.add_task("publishing", total=len(events))
        for i, (topic, record) in enumerate(events, start=1):
            producer.send(topic, record, headers={RUN_HEADER: run_id})
            published.count[_kind(topic, producer.topics.spec(topic).event_type, record)] += 1
            if i % 1000 == 0:
                progress.update(task, completed=i)
        progress.update(task, description="waiting for delivery reports")
        producer.flush()
        progress.update(task, completed=len(events), description="published")
    published.seconds = time.perf_counter() - start
    console.print(
        f"{published.total:,} events delivered in {published.seconds:.1f}s "
        f"({published.total / published.seconds:,.0f} events/s, idempotent producer, acks=all)"
    )
    return published


def step_consume(
    settings: Settings, serde: Serde, published: Published, run_id: str, timeout_s: float
) -> Arrived:
    step(4, "Consume it back")
    arrived = Arrived()
    expected = published.total
    start = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    topics = sorted({kind[0] for kind in published.count})
    with (
        _progress() as progress,
        EventConsumer(settings, serde, topics, group_id=None, from_beginning=True, name="demo") as consumer,
    ):
        task = progress.add_task("consuming", total=expected)
        while not (arrived.total >= expected and consumer.caught_up()):
            if time.monotonic() > deadline:
                raise HeadwaterError(
                    f"only {arrived.total:,} of {expected:,} published events were read back "
                    f"within {timeout_s:.0f}s"
                )
            for event in consumer.poll(max_records=1000, timeout_s=0.5):
                if event.headers.get(RUN_HEADER) != run_id.encode():
                    arrived.earlier_runs += 1
                    continue
                kind = _kind(event.topic, event.event_type, event.record)
                arrived.count[kind] += 1
                arrived.event_ids.add(event.record["event_id"])
                arrived.samples.setdefault(kind, event)
            progress.update(task, completed=arrived.total)
    arrived.seconds = time.perf_counter() - start
    return arrived


def step_report(published: Published, arrived: Arrived) -> None:
    table = Table("topic", "event type", "kind", "published", "arrived", title="events of this run")
    for kind in sorted(published.count.keys() | arrived.count.keys()):
        table.add_row(*kind, f"{published.count[kind]:,}", f"{arrived.count[kind]:,}")
    console.print(table)
    duplicates = arrived.total - len(arrived.event_ids)
    console.print(
        f"{arrived.total:,} events read back in {arrived.seconds:.1f}s "
        f"({arrived.total / max(arrived.seconds, 1e-9):,.0f} events/s), {duplicates} duplicates"
        + (f"; {arrived.earlier_runs:,} events of earlier runs skipped" if arrived.earlier_runs else "")
    )
    for kind, event in sorted(arrived.samples.items()):
        console.print(
            f"[bold]{kind[0]}[/] {kind[2]}: partition {event.partition}, offset {event.offset}, "
            f"key {(event.key or b'').decode(errors='replace')}"
        )
        console.print_json(to_json(event.record))
    if arrived.count != published.count:
        raise HeadwaterError("the events read back differ from those published (see the table above)")


SHOWN_FEATURES = {
    "user_activity": ["impressions_1h", "impressions_24h", "clicks_7d", "ctr_7d", "distinct_items_24h"],
    "item_activity": ["impressions_24h", "clicks_24h", "ctr_24h", "distinct_users_24h"],
}


def step_features(
    settings: Settings, events: list[tuple[str, dict[str, Any]]], published_at: float, timeout_s: float
) -> None:
    step(5, "Features in real time")
    repository = load_repository(settings)
    clicks = [r for topic, r in events if topic == "clicks"]
    expected: dict[str, dict[str, int]] = {}  # feature set -> entity -> its latest event time
    activity: dict[str, Counter[str]] = {}
    for fs in repository.feature_sets:
        if fs.source == "clicks":
            latest = expected.setdefault(fs.name, {})
            counts = activity.setdefault(fs.name, Counter())
            for r in clicks:
                latest[str(r[fs.entity])] = r["event_time"]
                counts[str(r[fs.entity])] += 1
    deadline = time.monotonic() + timeout_s
    with open_online_store(settings) as store:
        missing = sum(len(v) for v in expected.values())
        while missing:
            missing = 0
            for name, latest in expected.items():
                keys = list(latest)
                rows = store.get_batch(name, keys, [])
                missing += sum(
                    1 for k, r in zip(keys, rows, strict=True) if (r.event_time_ms or 0) < latest[k]
                )
            if missing and time.monotonic() > deadline:
                raise HeadwaterError(
                    f"{missing:,} entities lack their latest features after {timeout_s:.0f}s"
                )
            if missing:
                time.sleep(0.1)
        lag = time.perf_counter() - published_at
        total = sum(len(v) for v in expected.values())
        console.print(
            f"the stream processors computed {len(repository.feature_sets)} feature sets for {total:,} "
            f"entities; all current in the online store (LMDB) {lag:.1f}s after the last event was published"
        )
        for name, names in SHOWN_FEATURES.items():
            if name not in expected:
                continue
            top = [k for k, _ in activity[name].most_common(5)]
            start = time.perf_counter()
            rows = store.get_batch(name, top, names)
            read_us = (time.perf_counter() - start) * 1e6
            table = Table(
                repository.feature_set(name).entity, *names, "age", title=f"{name} (read in {read_us:.0f} µs)"
            )
            for key, row in zip(top, rows, strict=True):
                cells = [_cell(row.values[n]) for n in names]
                table.add_row(key, *cells, f"{(row.age_ms or 0) / 1000:.1f}s")
            console.print(table)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


TOP_ITEMS_SQL = """
SELECT item_id,
       countIf(action = 'IMPRESSION') AS impressions,
       countIf(action = 'CLICK') AS clicks,
       round(clicks / impressions, 4) AS ctr
FROM clicks
WHERE endsWith(event_id, {run:String})
GROUP BY item_id
ORDER BY clicks DESC, impressions DESC
LIMIT 5
"""


def step_history(
    settings: Settings, events: list[tuple[str, dict[str, Any]]], run_id: str, timeout_s: float
) -> None:
    step(6, "History in ClickHouse")
    clicks = sum(1 for topic, _ in events if topic == "clicks")
    suffix = f"-{run_id}"
    deadline = time.monotonic() + timeout_s
    with open_offline_store(settings) as offline:
        count_sql = "SELECT count() AS n FROM clicks WHERE endsWith(event_id, {run:String})"
        while (archived := int(offline.query(count_sql, {"run": suffix}).column("n")[0].as_py())) < clicks:
            if time.monotonic() > deadline:
                raise HeadwaterError(
                    f"only {archived:,} of {clicks:,} clicks reached the lake in {timeout_s:.0f}s"
                )
            time.sleep(0.2)
            offline.refresh()
        console.print(
            f"the lake sink archived all {clicks:,} clicks as Parquet under {settings.lake_dir}; "
            "the embedded ClickHouse engine (chdb) queries them as tables named like the topics:"
        )
        shown_sql = TOP_ITEMS_SQL.strip().replace("{run:String}", repr(suffix))
        console.print(f"[dim]{shown_sql}[/]")
        result = offline.query(TOP_ITEMS_SQL, {"run": suffix})
        table = Table(*result.column_names, title="most clicked items of this run")
        for row in result.to_pylist():
            table.add_row(*(_cell(v) for v in row.values()))
        console.print(table)
    outcomes = [r for topic, r in events if topic == "outcomes"]
    if not outcomes:
        console.print("no click outcomes in this slice of the clickstream: no training set to build")
        return
    labels = pd.DataFrame(
        {
            "user_id": [o["entity_key"] for o in outcomes],
            "item_id": [o["item_id"] for o in outcomes],
            "position": [2] * len(outcomes),
            "label_time": pd.array([o["event_time"] - 1 for o in outcomes], dtype="int64"),
            "clicked": [o["value"] for o in outcomes],
        }
    )
    refs = [
        "user_activity:clicks_7d",
        "user_activity:ctr_7d",
        "item_activity:ctr_24h",
        "item_ctr:ctr_at_position",
    ]
    start = time.perf_counter()
    with FeatureStore(settings) as features:
        training = features.get_historical_features(labels, refs, bitemporal=False)
        written_by_then = features.get_historical_features(labels, refs[:1])
    seconds = time.perf_counter() - start
    console.print(
        f"a point-in-time training set: {len(training):,} click labels joined to {len(refs)} features as of "
        f"1 ms before each click (ASOF JOIN), in {seconds:.2f}s for both variants below"
    )
    table = Table("user", "item", "label time", "clicked", *(r.split(":")[1] for r in refs))
    for row in training.tail(5).to_dict("records"):
        when = datetime.fromtimestamp(row["label_time"] / 1000, UTC)
        table.add_row(
            row["user_id"][:8], str(row["item_id"]), f"{when:%m-%d %H:%M:%S}", _cell(row["clicked"]),
            *(_cell(row[r]) for r in refs),
        )  # fmt: skip
    console.print(table)
    have = int(written_by_then[refs[0]].notna().sum())
    console.print(
        f"bitemporal (the default) also requires the value to have been written by the label time: "
        f"{have:,} of {len(labels):,} labels qualify, since this replay computed a week of features just now"
    )


def step_stop(settings: Settings, stack: Stack, keep_running: bool) -> None:
    step(9, "Stop")
    if not stack.started:
        for name in [] if keep_running else stop_services(settings, stack.services_started):
            console.print(f"stopped {name}")
        console.print("nothing else to stop: the demo did not start Kafka")
    elif keep_running:
        console.print(
            f"the embedded broker keeps running at {stack.bootstrap} (memory only): try "
            f"`headwater --data-dir {settings.data_dir} models list`, stop it with "
            f"`headwater --data-dir {settings.data_dir} down`"
        )
    else:
        services, pid = stop_stack(settings)
        for name in services:
            console.print(f"stopped {name}")
        console.print(f"stopped the embedded broker (pid {pid})")


def _demo_settings(settings: Settings) -> Settings:
    """The demo's own data directory, emptied: a re-run trains on this run's week only.

    Each run replays the sample as new traffic; in a shared lake, a second copy of the same
    week would reach the features of the first and leak clicks into the training sets.
    """
    own = settings.model_copy(update={"data_dir": settings.data_dir / "demo"})
    if own.data_dir.exists():
        stop_stack(own)  # a broker and services left running by `headwater demo --keep-running`
        shutil.rmtree(own.data_dir)
    return own


def demo(
    ctx: typer.Context,
    campaign: Annotated[
        list[str] | None,
        typer.Option("--campaign", "-c", help=f"Campaign to publish, repeatable: {', '.join(CAMPAIGNS)}."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="Publish only the first N events.")
    ] = None,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Leave the broker this demo started running.")
    ] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the events to come back.")
    ] = 60.0,
) -> None:
    """Run the platform end to end: start Kafka, publish the real clickstream, read it back, stop."""
    settings = settings_of(ctx)
    campaigns = campaign or list(CAMPAIGNS)
    unknown = [c for c in campaigns if c not in CAMPAIGNS]
    if unknown:
        raise typer.BadParameter(f"unknown campaign {unknown[0]!r}; choose from {', '.join(CAMPAIGNS)}")
    run_id = uuid.uuid4().hex[:12]
    settings = _demo_settings(settings)
    console.rule(f"[bold]Headwater demo[/] (run {run_id})")
    console.print(f"data directory {settings.data_dir} (the demo's own, reset at each run)")
    stack = step_start_stack(settings)
    try:
        serde = serde_for(settings)
        events = step_load_clickstream(campaigns, limit, run_id)
        published = step_publish(settings, serde, events, run_id)
        published_at = time.perf_counter()
        arrived = step_consume(settings, serde, published, run_id, timeout_s)
        step_report(published, arrived)
        step_features(settings, events, published_at, timeout_s)
        step_history(settings, events, run_id, timeout_s)
        # Imported here: Dagster, scikit-learn and skops take seconds, every other command skips them.
        from headwater.cli.demo_ml import step_serve, step_train

        if step_train(settings, events, 7):
            step_serve(settings, events, 8, timeout_s)
    finally:
        step_stop(settings, stack, keep_running)
    console.rule("[bold green]demo complete")


def register(app: typer.Typer) -> None:
    app.command()(demo)
