"""Producer, consumer, dead letters and compacted state through the real embedded broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from headwater.settings import Settings
from streams.consumer import Event, EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde
from streams.state import CompactedState
from streams.topics import TopicCatalog
from tests.waiting import wait_for


def click(i: int, user: str = "u") -> dict[str, Any]:
    return {
        "event_id": f"e{i}", "event_time": 1_574_553_600_000 + i, "user_id": f"{user}{i % 7}",
        "item_id": str(i % 11), "action": "IMPRESSION", "position": 1 + i % 3, "campaign": "all",
        "propensity": 0.0125, "session_id": None, "user_features": {},
    }  # fmt: skip


def drain(
    consumer: EventConsumer, until: Callable[[list[Event]], bool], timeout_s: float = 30.0
) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout_s
    while not until(events):
        assert time.monotonic() < deadline, f"only {len(events)} events after {timeout_s}s"
        events += consumer.poll(500, 0.2)
    return events


def test_produce_and_consume_through_the_broker(settings: Settings, serde: Serde) -> None:
    with EventProducer(settings, serde) as producer:
        for i in range(500):
            producer.send("clicks", click(i))
        producer.flush()
        assert producer.delivered == 500 and producer.failed == 0
    with EventConsumer(settings, serde, ["clicks"]) as consumer:
        events = drain(consumer, lambda ev: consumer.caught_up() and len(ev) >= 500)
    assert sorted(e.record["event_id"] for e in events) == sorted(f"e{i}" for i in range(500))
    assert {e.event_type for e in events} == {"click"}
    assert all(e.key == e.record["user_id"].encode() for e in events)
    assert all(e.headers["event_type"] == b"click" and len(e.headers["trace_id"]) == 32 for e in events)


def test_group_consumer_resumes_after_committed_offsets(settings: Settings, serde: Serde) -> None:
    with EventProducer(settings, serde) as producer:
        for i in range(100):
            producer.send("clicks", click(i))
        producer.flush()
    with EventConsumer(settings, serde, ["clicks"], group_id="resume") as consumer:
        first = drain(consumer, lambda ev: consumer.caught_up() and len(ev) >= 100)
        consumer.commit()
    with EventProducer(settings, serde) as producer:
        for i in range(100, 130):
            producer.send("clicks", click(i))
        producer.flush()
    with EventConsumer(settings, serde, ["clicks"], group_id="resume") as consumer:
        second = drain(consumer, lambda ev: consumer.caught_up() and len(ev) >= 30)
    assert len(first) == 100
    assert sorted(e.record["event_id"] for e in second) == sorted(f"e{i}" for i in range(100, 130))


def test_uncommitted_events_are_delivered_again(settings: Settings, serde: Serde) -> None:
    with EventProducer(settings, serde) as producer:
        for i in range(50):
            producer.send("clicks", click(i))
        producer.flush()
    with EventConsumer(settings, serde, ["clicks"], group_id="crashy") as consumer:
        drain(consumer, lambda ev: len(ev) >= 50)  # effects never became durable: no commit
    with EventConsumer(settings, serde, ["clicks"], group_id="crashy") as consumer:
        again = drain(consumer, lambda ev: consumer.caught_up() and len(ev) >= 50)
    assert len({e.record["event_id"] for e in again}) == 50


def test_garbage_goes_to_dead_letters_and_good_records_flow(settings: Settings, serde: Serde) -> None:
    topics = TopicCatalog(settings)
    garbage = [b"not avro at all", b"\xc3\x01" + b"\xff" * 8 + b"\x00", serde.encode("click", click(0))[:12]]
    with EventProducer(settings, serde) as producer:
        for i in range(20):
            producer.send("clicks", click(i))
            if i % 7 == 0:
                producer.send_raw(topics.name("clicks"), garbage[i // 7], key=b"bad")
        producer.flush()
    with EventConsumer(settings, serde, ["clicks"], group_id="dlq-test", name="dlq-test") as consumer:
        good = drain(consumer, lambda ev: consumer.caught_up() and len(ev) >= 20)
        consumer.commit()
        assert consumer.dead_lettered == 3
    assert len(good) == 20
    with EventConsumer(settings, serde, ["dead-letters"]) as dlq:
        letters = drain(dlq, lambda ev: len(ev) >= 3)
    by_value = {e.record["original_value"]: e.record for e in letters}
    assert set(by_value) == set(garbage)
    for letter in by_value.values():
        assert letter["source_topic"] == topics.name("clicks")
        assert letter["consumer"] == "dlq-test"
        assert letter["error_type"] == "DecodeError" and letter["error"]
        assert letter["original_key"] == b"bad"
        assert (
            letter["event_id"]
            == f"{letter['source_topic']}/{letter['source_partition']}/{letter['source_offset']}"
        )


def bandit(experiment: str, pulls: int) -> dict[str, Any]:
    arms = [{"variant": "a", "pulls": pulls, "reward_sum": pulls / 2, "reward_sq_sum": pulls / 2}]
    return {
        "event_id": f"{experiment}-{pulls}",
        "event_time": pulls,
        "experiment_id": experiment,
        "arms": arms,
    }


def test_compacted_state_latest_value_per_key_after_restart(settings: Settings, serde: Serde) -> None:
    topics = TopicCatalog(settings)
    with EventProducer(settings, serde) as producer:
        for pulls in range(1, 6):
            for exp in ("exp-a", "exp-b", "exp-gone"):
                producer.send("bandit-state", bandit(exp, pulls))
        producer.flush()
    changes: list[tuple[str, Any]] = []
    with CompactedState(
        settings, serde, "bandit-state", on_change=lambda k, r, _e: changes.append((k, r))
    ) as state:
        state.wait_until_caught_up()
        assert {k: v["arms"][0]["pulls"] for k, v in state.snapshot().items()} == {
            "exp-a": 5, "exp-b": 5, "exp-gone": 5,
        }  # fmt: skip
        with EventProducer(settings, serde) as producer:  # follows changes after catching up
            producer.send("bandit-state", bandit("exp-a", 9))
            producer.send_raw(topics.name("bandit-state"), None, key=b"exp-gone")  # tombstone
            producer.flush()
        wait_for(
            lambda: state.get("exp-gone") is None and (state.get("exp-a") or {}).get("event_id") == "exp-a-9"
        )
    assert ("exp-gone", None) in changes
    # A restarted reader rebuilds the same view from the topic alone.
    with CompactedState(settings, serde, "bandit-state") as restarted:
        restarted.wait_until_caught_up()
        assert {k: v["arms"][0]["pulls"] for k, v in restarted.snapshot().items()} == {"exp-a": 9, "exp-b": 5}
