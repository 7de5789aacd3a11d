"""Results do not depend on when or how fast events were processed.

The same events, each partition delivering them in the same order, are processed by the real
feature processors and online-store writer on the embedded broker in several timings: a cold
backlog, the partitions published one after another, live traffic while the processors run,
and one partition held back until the others were processed. Every run must accept and
reject the same events, for the same reasons, and end with the same feature values at every
update time and the same online reads, all equal to an independent computation
(tests/features/oracle.py) of the written rules: an event is too late when it is more than
the lateness behind what its own partition delivered before it, a repeated event id counts
once, an event from the future is refused.

The events include, in every partition, ones delayed past the lateness (too late), client
retries (duplicates, and one retried beyond the lateness), and one from a wrong clock a day
ahead. Items are entities on a topic keyed by user, so each item's events come from every
partition, in whatever interleaving the consumer fetched them.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from features.examples.clickstream import item_activity, user_activity
from headwater.settings import Settings
from processors.features import FeatureProcessor
from processors.worker import run_processors
from serving.online_store import open_online_store
from streams.consumer import Event, EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog
from tests.conftest import create_topics
from tests.features.oracle import accepted, expected, values_at
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 3
SETS = (user_activity, item_activity)
NAMES = ["features-user_activity", "features-item_activity", "online-store-writer"]
NOW = int(time.time() * 1000)
START = NOW - 3 * 3_600_000
READ_AT = NOW + 30 * 60_000  # every entity read half an hour after the last event
SKEW_MS = 300_000

Keyed = tuple[str, str, int]  # feature set, entity, event time


def _partition_sequences(seed: int = 23) -> list[list[dict[str, Any]]]:
    """Each partition's events in delivery order, with late ones, retries and a wrong clock."""
    rng = random.Random(seed)
    users = [f"user{i:02d}" for i in range(24)]
    sequences: list[list[dict[str, Any]]] = [[] for _ in range(PARTITIONS)]
    for n in range(1800):
        user = rng.choice(users)
        t = START + rng.randint(0, 3 * 3_600_000 - 1)
        event = {
            "event_id": f"ev{n}", "event_time": t, "user_id": user, "item_id": f"item{rng.randint(0, 7)}",
            "action": "CLICK" if rng.random() < 0.15 else "IMPRESSION", "position": rng.randint(1, 3),
            "campaign": "all", "propensity": rng.choice([0.0125, 0.025]), "session_id": None,
            "user_features": {},
        }  # fmt: skip
        sequences[int(user[4:]) % PARTITIONS].append(event)
    for p, seq in enumerate(sequences):
        seq.sort(key=lambda e: e["event_time"])
        for i in sorted(rng.sample(range(20, len(seq) - 40), 8), reverse=True):  # delivered ~4 min late
            seq.insert(i + 14, seq.pop(i))
        for e in rng.sample(seq[:-20], 8):  # retried within the lateness: a duplicate
            seq.insert(seq.index(e) + 1, dict(e))
        seq.append(dict(seq[5]))  # retried hours later: too late (counted once either way)
        if p == 0:
            wrong_clock = {**seq[len(seq) // 2], "event_id": "ev-future", "event_time": NOW + 86_400_000}
            seq.insert(len(seq) // 2, wrong_clock)
    return sequences


SEQUENCES = _partition_sequences()


@dataclass
class Outcome:
    rejected: dict[str, list[str]] = field(default_factory=dict)  # event id -> reasons
    values: dict[Keyed, dict[str, Any]] = field(default_factory=dict)  # last update per key
    reads: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # online, at READ_AT
    # Per (feature set, entity) the ids of its updates in log order: the update stream itself.
    streams: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def _oracle() -> Outcome:
    partition_of = {id(e): p for p, seq in enumerate(SEQUENCES) for e in seq}
    arrivals = [e for seq in SEQUENCES for e in seq]  # any interleaving: lateness is per partition
    on_time = [e for e in arrivals if e["event_time"] <= NOW + SKEW_MS]

    def partition(e: dict[str, Any]) -> int:
        return partition_of[id(e)]

    out = Outcome()
    for e in arrivals:
        if e["event_time"] > NOW + SKEW_MS:
            out.rejected.setdefault(e["event_id"], []).extend(["future"] * len(SETS))
    for fs in SETS:
        kept = accepted(fs, on_time, partition)
        kept_ids = {id(e) for e in kept}
        seen: set[str] = set()
        for e in on_time:
            if id(e) in kept_ids:
                seen.add(e["event_id"])
            else:  # an id already counted is a duplicate, unless it also came too late
                out.rejected.setdefault(e["event_id"], []).append("duplicate_or_too_late")
        for (entity, t), values in expected(fs, on_time, partition).items():
            out.values[(fs.name, entity, t)] = values
        by_entity: dict[str, list[dict[str, Any]]] = {}
        for e in kept:
            by_entity.setdefault(str(e[fs.entity]), []).append(e)
        for entity, events in by_entity.items():
            out.reads[(fs.name, entity)] = values_at(fs, events, READ_AT)
    return out


ORACLE = _oracle()


def _settings(
    broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory, name: str, engine: str
) -> Settings:
    processors = broker_settings.processors.model_copy(update={"engine": engine, "idle_partition_s": 600.0})
    s = broker_settings.model_copy(
        update={
            "topic_prefix": f"wm-{name}.",
            "data_dir": tmp_path_factory.mktemp(f"wm-{name}"),
            "processors": processors,
        }
    )
    create_topics(s)
    assert TopicCatalog(s).partitions(TopicCatalog(s).spec("clicks")) == PARTITIONS
    return s


class _Publisher:
    def __init__(self, settings: Settings, serde: Serde) -> None:
        self.producer = EventProducer(settings, serde)
        self.topic = TopicCatalog(settings).name("clicks")
        self.serde = serde

    def send(self, items: list[tuple[int, dict[str, Any]]]) -> None:
        for p, event in items:
            self.producer.send_raw(
                self.topic, self.serde.encode("click", event), key=event["user_id"].encode(),
                headers=[("event_type", "click")], partition=p,
            )  # fmt: skip
        self.producer.flush()

    def close(self) -> None:
        self.producer.close()


def _round_robin(partitions: list[int]) -> list[tuple[int, dict[str, Any]]]:
    """The given partitions' events interleaved one at a time, each partition in its order."""
    queues = {p: list(SEQUENCES[p]) for p in partitions}
    out = []
    while any(queues.values()):
        for p in partitions:
            if queues[p]:
                out.append((p, queues[p].pop(0)))
    return out


class _Collector:
    """Reads the outputs as they arrive: dead letters and feature updates."""

    def __init__(self, settings: Settings, serde: Serde) -> None:
        self.consumer = EventConsumer(settings, serde, ["dead-letters", "feature-updates"])
        self.serde = serde
        self.outcome = Outcome()

    def poll(self) -> Outcome:
        while batch := self.consumer.poll(5000, 0.1):
            for e in batch:
                r = e.record
                if e.topic == "dead-letters":
                    _, original = self.serde.decode(r["original_value"])
                    reason = r["error"].split(":", 1)[0]
                    self.outcome.rejected.setdefault(original["event_id"], []).append(reason)
                else:
                    self.outcome.values[(r["feature_set"], r["entity_key"], r["event_time"])] = r["values"]
                    self.outcome.streams.setdefault((r["feature_set"], r["entity_key"]), []).append(
                        r["event_id"]
                    )
        return self.outcome

    def complete(self) -> bool:
        got = self.poll()
        return len(got.values) >= len(ORACLE.values) and sum(map(len, got.rejected.values())) >= sum(
            map(len, ORACLE.rejected.values())
        )

    def close(self) -> None:
        self.consumer.close()


@contextmanager
def _running(settings: Settings) -> Iterator[threading.Event]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_processors(settings, NAMES, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "processors did not stop"
        assert not errors, errors


def _backlog(settings: Settings, publisher: _Publisher, collector: _Collector, order: list[int]) -> None:
    for p in order:
        publisher.send([(p, e) for e in SEQUENCES[p]])
    for names in (NAMES[:2], NAMES[2:]):  # producers of feature updates first, then their reader
        run_processors(settings, names, threading.Event(), until_caught_up=True)
    wait_for(collector.complete, 60, "every update and dead letter")


def _live(settings: Settings, publisher: _Publisher, collector: _Collector, delayed: int | None) -> None:
    first = [p for p in range(PARTITIONS) if p != delayed]
    items = _round_robin(first)
    with _running(settings):
        for start in range(0, len(items), 200):  # a steady trickle while the processors run
            publisher.send(items[start : start + 200])
        if delayed is not None:
            # The others processed first, this partition's events only then (an outage upstream).
            want = {
                (fs.name, str(e[fs.entity]), e["event_time"])
                for p in first
                for e in SEQUENCES[p]
                for fs in SETS
            }
            wait_for(lambda: want & set(collector.poll().values) == want & set(ORACLE.values), 120, "others")
            publisher.send([(delayed, e) for e in SEQUENCES[delayed]])
        wait_for(collector.complete, 180, "every update and dead letter")
        _wait_online(settings, collector)


def _wait_online(settings: Settings, collector: _Collector) -> None:
    """Until the writer applied every entity's latest update (the processors keep running)."""
    latest: dict[tuple[str, str], int] = {}
    for fs_name, entity, t in collector.outcome.values:
        latest[(fs_name, entity)] = max(t, latest.get((fs_name, entity), t))

    def applied() -> bool:
        with open_online_store(settings) as store:
            for fs in SETS:
                keys = [e for (name, e) in latest if name == fs.name]
                rows = store.get_batch(fs.name, keys, fs.feature_names[:1], now_ms=READ_AT)
                if any(r.event_time_ms != latest[(fs.name, k)] for k, r in zip(keys, rows, strict=True)):
                    return False
        return True

    wait_for(applied, 60, "the online store")


SCENARIOS: dict[str, Callable[[Settings, _Publisher, _Collector], None]] = {
    "backlog": lambda s, p, c: _backlog(s, p, c, [0, 1, 2]),
    "backlog-partitions-reversed": lambda s, p, c: _backlog(s, p, c, [2, 1, 0]),
    "live": lambda s, p, c: _live(s, p, c, None),
    "live-one-partition-delayed": lambda s, p, c: _live(s, p, c, 1),
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return bool(a == b)


@pytest.mark.parametrize(
    ("scenario", "engine"),
    [("backlog", "faust"), ("backlog-partitions-reversed", "native"), ("live", "faust"),
     ("live-one-partition-delayed", "faust")],
)  # fmt: skip
def test_every_timing_accepts_rejects_and_computes_the_same(
    broker_settings: Settings,
    serde: Serde,
    tmp_path_factory: pytest.TempPathFactory,
    scenario: str,
    engine: str,
) -> None:
    settings = _settings(broker_settings, tmp_path_factory, scenario, engine)
    publisher, collector = _Publisher(settings, serde), _Collector(settings, serde)
    try:
        SCENARIOS[scenario](settings, publisher, collector)
        got = collector.poll()
        with open_online_store(settings) as store:
            for fs in SETS:
                keys = sorted(e for (name, e) in ORACLE.reads if name == fs.name)
                for key, row in zip(
                    keys, store.get_batch(fs.name, keys, fs.feature_names, now_ms=READ_AT), strict=True
                ):
                    got.reads[(fs.name, key)] = row.values
    finally:
        publisher.close()
        collector.close()
    # The same rejections: duplicates and late ones told apart (the oracle knows only that they are out).
    reasons = {k: sorted("duplicate_or_too_late" if r in ("duplicate", "too_late") else r for r in v)
               for k, v in got.rejected.items()}  # fmt: skip
    assert reasons == {k: sorted(v) for k, v in ORACLE.rejected.items()}
    assert sum(r.count("too_late") for r in got.rejected.values()) >= 2 * PARTITIONS  # some of each
    assert sum(r.count("duplicate") for r in got.rejected.values()) >= 8 * len(SETS)
    assert got.values.keys() == ORACLE.values.keys()
    bad = [k for k, v in ORACLE.values.items() if not all(_same(got.values[k][n], x) for n, x in v.items())]
    assert not bad, [(k, got.values[k], ORACLE.values[k]) for k in bad[:3]]
    assert got.reads.keys() == ORACLE.reads.keys()
    bad_reads = [
        k for k, v in ORACLE.reads.items() if not all(_same(got.reads[k][n], x) for n, x in v.items())
    ]
    assert not bad_reads, [(k, got.reads[k], ORACLE.reads[k]) for k in bad_reads[:3]]
    assert any(v["clicks_24h"] for v in got.reads.values())
    if scenario.startswith("backlog"):
        # A backlog is released in one order whatever the interleaving its partitions were
        # fetched in (event time, then partition): the same update stream, update for update.
        assert got.streams == _canonical_streams()


def _canonical_streams() -> dict[tuple[str, str], list[str]]:
    """The update ids per key when the partitions are merged as a backlog is: the head with the
    smallest (event time, partition) first (an event from the future at once), each partition in
    its own order, through the pure processor."""
    heads = [0] * PARTITIONS
    events = []

    def key(p: int) -> tuple[int, int]:
        t = SEQUENCES[p][heads[p]]["event_time"]
        return (-1 if t > NOW + SKEW_MS else t, p)

    while live := [p for p in range(PARTITIONS) if heads[p] < len(SEQUENCES[p])]:
        p = min(live, key=key)
        events.append(Event("clicks", p, heads[p], None, "click", SEQUENCES[p][heads[p]], {}, 0))
        heads[p] += 1
    out: dict[tuple[str, str], list[str]] = {}
    for fs in SETS:
        processor = FeatureProcessor(fs, {}, max_future_ms=SKEW_MS)
        processor.watch({("clicks", p) for p in range(PARTITIONS)})
        for _, update in processor.handle(events, NOW).outputs:
            out.setdefault((update["feature_set"], update["entity_key"]), []).append(update["event_id"])
    return out
