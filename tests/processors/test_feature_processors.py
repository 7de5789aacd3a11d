"""Feature processors through the real broker: correct values, and exact after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from features.engine import Aggregator, evaluate_tiles
from headwater.sample_data import merged_events
from headwater.settings import Settings
from processors.state_store import StateStore
from processors.worker import load_repository, run_processors
from serving.online_store import open_online_store
from streams.consumer import EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde
from tests.conftest import create_topics
from tests.waiting import wait_for

FEATURE_PROCESSORS = ["features-user_activity", "features-item_activity"]


@pytest.fixture(scope="module")
def clickstream() -> list[dict[str, Any]]:
    """The real sample, all three campaigns merged in event-time order (30,130 click events)."""
    return [record for topic, record in merged_events() if topic == "clicks"]


def publish(settings: Settings, serde: Serde, clicks: list[dict[str, Any]]) -> None:
    with EventProducer(settings, serde) as producer:
        for record in clicks:
            producer.send("clicks", record)
        producer.flush()


def run_to_end(settings: Settings) -> None:
    """Feature processors until drained, then the online-store writer until drained."""
    for names in (FEATURE_PROCESSORS, ["online-store-writer"]):
        run_processors(settings, names, threading.Event(), until_caught_up=True)


def online_values(
    settings: Settings, entities: dict[str, set[str]], now_ms: int
) -> dict[tuple[str, str], Any]:
    """Values and event times per entity as of ``now_ms`` (TTL is by event time; the sample is 2019's)."""
    repository = load_repository(settings)
    out = {}
    with open_online_store(settings) as store:
        for fs_name, keys in entities.items():
            names = [f.name for f in repository.feature_set(fs_name).features]
            ordered = sorted(keys)
            for key, row in zip(
                ordered, store.get_batch(fs_name, ordered, names, now_ms=now_ms), strict=True
            ):
                out[(fs_name, key)] = (row.event_time_ms, row.values)
    return out


def latest_updates(settings: Settings, serde: Serde) -> tuple[dict[tuple[str, str], Any], list[str]]:
    """Latest feature update per (feature set, entity), as compaction keeps it, and every event id."""
    latest: dict[tuple[str, str], Any] = {}
    ids: list[str] = []
    with EventConsumer(settings, serde, ["feature-updates"]) as consumer:
        while True:
            events = consumer.poll(5000, 0.2)
            for e in events:
                r = e.record
                latest[(r["feature_set"], r["entity_key"])] = (r["event_time"], r["values"])
                ids.append(r["event_id"])
            if not events and consumer.caught_up():
                return latest, ids


def test_streaming_values_equal_the_pure_engine(
    settings: Settings, serde: Serde, clickstream: list[dict[str, Any]]
) -> None:
    publish(settings, serde, clickstream)
    run_to_end(settings)
    repository = load_repository(settings)
    expected: dict[tuple[str, str], Any] = {}
    tiles: dict[tuple[str, str], bytes] = {}
    for fs_name in ("user_activity", "item_activity"):
        aggregator = Aggregator(repository.feature_set(fs_name))
        for record in clickstream:  # event-time order: what the aligned runtime must reproduce
            for update in aggregator.apply(record, 0):
                expected[(fs_name, update["entity_key"])] = (update["event_time"], update["values"])
                tiles[(fs_name, update["entity_key"])] = update["tiles"]
        assert not aggregator.stats.get("rejected_too_late")
    latest, _ = latest_updates(settings, serde)
    assert latest == expected
    # Read at the stream's end, every window is evaluated then: each entity's latest values as
    # the pure engine's tiles give them at that time.
    end = clickstream[-1]["event_time"]
    read = {k: (t, evaluate_tiles(tiles[k], end)[0]) for k, (t, _) in expected.items()}
    entities = {fs: {k for f, k in expected if f == fs} for fs in ("user_activity", "item_activity")}
    assert online_values(settings, entities, end) == read
    assert read != expected  # some windows did lose tiles by then


def test_sigkill_mid_stream_then_restart_equals_uninterrupted_run(
    settings: Settings, serde: Serde, clickstream: list[dict[str, Any]], tmp_path: Path
) -> None:
    reference = settings.model_copy(
        update={"topic_prefix": settings.topic_prefix + "ref.", "data_dir": tmp_path / "ref"}
    )
    create_topics(reference)
    publish(reference, serde, clickstream)
    run_to_end(reference)

    publish(settings, serde, clickstream)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    argv = [sys.executable, "-m", "headwater.cli", "--config", str(config), "process", *FEATURE_PROCESSORS]
    log = (tmp_path / "killed.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    state_dir = settings.data_dir / "state" / "features-item_activity"

    def progressed() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"processor exited early: {(tmp_path / 'killed.log').read_text()}")
        if not (state_dir / "data.mdb").exists():
            return False
        store = StateStore(state_dir)
        try:
            done = sum(store.positions().values())
        finally:
            store.close()
        return done > 5_000

    wait_for(progressed, timeout_s=60, what="the processors to be mid-stream")
    os.kill(proc.pid, signal.SIGKILL)  # no shutdown hook runs: a crash at an arbitrary point
    proc.wait()
    run_to_end(settings)

    expected_latest, expected_ids = latest_updates(reference, serde)
    latest, ids = latest_updates(settings, serde)
    assert latest == expected_latest
    assert set(ids) == set(expected_ids)  # replays re-emit identical ids; nothing lost, nothing new
    entities = {fs: {k for f, k in expected_latest if f == fs} for fs in ("user_activity", "item_activity")}
    now_ms = clickstream[-1]["event_time"]
    assert online_values(settings, entities, now_ms) == online_values(reference, entities, now_ms)
