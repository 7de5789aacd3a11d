"""The Faust engine hosts the same processors: same outputs as the native engine, exact after a restart.

Real broker, real Faust apps (one per processor, as ``headwater process`` runs them with
``processors.engine: faust``), real online store; the real clickstream sample.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, cast

from confluent_kafka import Consumer, TopicPartition

from features.engine import Aggregator
from headwater.settings import ProcessorSettings, Settings
from processors.faust import FaustHost
from processors.state_store import Position, StateStore
from processors.worker import build_hosts, load_repository, run_processors
from streams.broker import resolve_bootstrap
from streams.consumer import EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog
from tests.conftest import create_topics
from tests.processors.test_feature_processors import (  # noqa: F401 - clickstream is a fixture
    clickstream,
    latest_updates,
    online_values,
    publish,
    run_to_end,
)
from tests.waiting import wait_for

GARBAGE = b"\x00not an avro event"


def engine(settings: Settings, name: str, kind: str) -> Settings:
    """A copy of ``settings`` on topics and a data directory of its own, running ``kind``."""
    copy = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}{name}.",
            "data_dir": settings.data_dir / name,
            "processors": ProcessorSettings(engine=kind),  # type: ignore[arg-type]
        }
    )
    create_topics(copy)
    return copy


def publish_with_bad_events(settings: Settings, serde: Serde, clicks: list[dict[str, Any]]) -> None:
    """The sample with, halfway, bytes that are no event and a click without its user (entity key)."""
    half = len(clicks) // 2
    publish(settings, serde, clicks[:half])
    with EventProducer(settings, serde) as producer:
        producer.send_raw(TopicCatalog(settings).name("clicks"), GARBAGE, key=b"u-bad", partition=0)
        producer.send("clicks", {**clicks[half], "event_id": "no-user", "user_id": ""}, key="no-user")
        producer.flush()
    publish(settings, serde, clicks[half:])


def read_all(settings: Settings, serde: Serde, topic: str) -> list[dict[str, Any]]:
    with EventConsumer(settings, serde, [topic]) as consumer:
        records: list[dict[str, Any]] = []
        while True:
            events = consumer.poll(5000, 0.2)
            records += [e.record for e in events]
            if not events and consumer.caught_up():
                return records


def updates(settings: Settings, serde: Serde) -> tuple[list[str], dict[tuple[str, str, int], Any]]:
    """Every update's id, and per (feature set, entity, event time) the values of the last one.

    Several events of an entity at the same event time on different partitions are merged in
    arrival order, so the updates between them may differ from run to run; the last one at
    that time holds all of them (log order per key), as the parity test compares.
    """
    ids, values = [], {}
    for r in read_all(settings, serde, "feature-updates"):
        ids.append(r["event_id"])
        values[(r["feature_set"], r["entity_key"], r["event_time"])] = r["values"]
    return sorted(ids), values


def dead_letters(settings: Settings, serde: Serde) -> list[tuple[Any, ...]]:
    return sorted(
        (r["consumer"], r["source_partition"], r["source_offset"], r["error_type"], r["original_value"])
        for r in read_all(settings, serde, "dead-letters")
    )


def group_offsets(settings: Settings, group: str, positions: list[Position]) -> dict[Position, int]:
    """The offsets the consumer group committed (Faust's own commits), read without joining it."""
    consumer = Consumer({"bootstrap.servers": resolve_bootstrap(settings), "group.id": group})
    try:
        committed = consumer.committed([TopicPartition(t, p) for t, p in positions], timeout=10)
    finally:
        consumer.close()
    return {(tp.topic, tp.partition): tp.offset for tp in committed}


def test_faust_engine_equals_native_engine_with_dead_letters(
    settings: Settings,
    serde: Serde,
    clickstream: list[dict[str, Any]],  # noqa: F811 - the fixture
) -> None:
    clicks = clickstream[:10_000]  # the sample's first third (Faust takes ~5 s per 10,000 here)
    native, faust = engine(settings, "native", "native"), engine(settings, "faust", "faust")
    for s in (native, faust):
        publish_with_bad_events(s, serde, clicks)
        run_to_end(s)  # processors.worker.run_processors: the engine comes from the settings

    expected_ids, expected_values = updates(native, serde)
    assert len(expected_ids) > 2 * len(clicks)  # both feature sets, every click event
    ids, values = updates(faust, serde)
    assert ids == expected_ids  # the same updates (write times aside), none missing, none extra
    assert values == expected_values
    latest, _ = latest_updates(native, serde)
    entities = {fs: {k for f, k in latest if f == fs} for fs in ("user_activity", "item_activity")}
    now_ms = clicks[-1]["event_time"]
    assert online_values(faust, entities, now_ms) == online_values(native, entities, now_ms)

    # The undecodable bytes, by both feature processors; the click without a user, by the user one.
    letters = dead_letters(faust, serde)
    assert [(c, e) for c, _, _, e, _ in letters] == [
        ("features-item_activity", "DecodeError"),
        ("features-user_activity", "DecodeError"),
        ("features-user_activity", "EventRejected"),
    ]
    assert letters[0][4] == letters[1][4] == GARBAGE
    assert letters == dead_letters(native, serde)  # same partitions and offsets too


def test_faust_restart_resumes_from_the_stored_positions(
    settings: Settings,
    serde: Serde,
    clickstream: list[dict[str, Any]],  # noqa: F811 - the fixture
) -> None:
    clicks = clickstream[10_000:25_000]  # another part of the sample than the first test's
    faust = engine(settings, "faust", "faust")
    publish(faust, serde, clicks)
    repository = load_repository(faust)
    name = "features-user_activity"

    small = functools.partial(FaustHost, batch_size=1000)  # a stop between batches, not after all
    first = build_hosts(faust, serde, repository, [name], small)[name]
    stop = threading.Event()
    thread = threading.Thread(target=first.run, args=(stop,), name="faust-first", daemon=True)
    thread.start()
    try:
        wait_for(lambda: first.processed >= 3_000, timeout_s=40, what="the Faust host to be mid-stream")
    finally:
        stop.set()  # a clean stop: what was handled is committed with its positions
        thread.join(30)
    assert not thread.is_alive()
    first.close()
    assert first.error is None
    assert first.processed < len(clicks), "stopped too late to test a restart mid-stream"
    store = StateStore(faust.data_dir / "state" / name)
    try:
        assert sum(store.positions().values()) == first.processed  # positions = events handled
    finally:
        store.close()

    second = build_hosts(faust, serde, repository, [name], FaustHost)[name]
    try:
        second.run(threading.Event(), until_caught_up=True)
    finally:
        second.close()
    assert second.processed == len(clicks) - first.processed  # from the positions, none twice

    aggregator = Aggregator(repository.feature_set("user_activity"))
    expected = {}
    for record in clicks:
        for update in aggregator.apply(record, 0):
            expected[("user_activity", update["entity_key"])] = (update["event_time"], update["values"])
    latest, _ = latest_updates(faust, serde)
    assert latest == expected  # a double-counted event would show in every later value of its user


def test_faust_flow_control_pauses_partitions_and_stops_cleanly(
    settings: Settings,
    serde: Serde,
    clickstream: list[dict[str, Any]],  # noqa: F811 - the fixture
) -> None:
    """An aligned processor whose buffer bound is small: its partitions are paused and resumed
    throughout the run (the 300,000-event benchmark's path), yet every event is handled once, in
    the native engine's order, and the Faust app stops cleanly at the end."""
    clicks = clickstream[25_000:30_000]  # another part of the sample than the other tests'
    native, faust = engine(settings, "native", "native"), engine(settings, "faust", "faust")
    name = "features-item_activity"  # keyed by item on a topic keyed by user: aligned
    for s in (native, faust):
        publish(s, serde, clicks)
    run_processors(native, [name], threading.Event(), until_caught_up=True)

    small = functools.partial(FaustHost, batch_size=100, max_buffered=40)
    host = cast(FaustHost, build_hosts(faust, serde, load_repository(faust), [name], small)[name])
    failures: list[BaseException] = []

    def run() -> None:  # in a thread, so that a host that never drains fails the test, not hangs it
        try:
            host.run(stop, until_caught_up=True)  # raises if a batch, the app or its stop failed
        except BaseException as exc:
            failures.append(exc)

    stop = threading.Event()
    thread = threading.Thread(target=run, name="faust-flow-control", daemon=True)
    thread.start()
    try:
        wait_for(lambda: not thread.is_alive(), timeout_s=120, what="the Faust host to drain and stop")
    finally:
        stop.set()
        thread.join(30)
        host.close()
    assert not failures, failures
    assert host.error is None
    assert host.pauses > 0, "the buffer bound was never reached: flow control not exercised"
    assert host.processed == len(clicks)  # none lost while paused, none twice
    store = StateStore(faust.data_dir / "state" / name)
    try:
        positions = store.positions()
    finally:
        store.close()
    assert sum(positions.values()) == len(clicks)  # everything committed at the stop
    # Faust's own commits (lag monitoring): the stored positions, committed by its stop.
    group = f"{faust.topic_prefix}headwater-faust-{name}"
    assert group_offsets(faust, group, list(positions)) == positions
    assert updates(faust, serde) == updates(native, serde)
