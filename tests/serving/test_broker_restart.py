"""The prediction service survives its broker: stopped and started again at the same address,
then at a new one (as ``headwater up`` does with a free port), while calls go on. The service
resumes logging prediction events by itself within seconds, follows the registry to the new
broker, counts what it lost by reason and logs it as summary lines, never a line per event."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from headwater.client import PredictionClient
from headwater.settings import Settings, load_settings
from models.pipeline import ModelPipeline
from models.spec import ModelSpec
from registry.registry import Registry
from serving.server import ServerThread
from streams.broker import EmbeddedBroker, free_port
from streams.consumer import EventConsumer
from streams.kafka import client_config
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog
from tests.serving.conftest import ITEMS, MODEL, USERS, feature_values, register, seed_online_store
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

RESUME_WITHIN_S = 15.0  # measured ~1-2 s (a new embedded broker) and <= 6 s (the stall rule)


def _models(settings: Settings, serde: Serde) -> list[tuple[bytes | None, dict[str, Any]]]:
    """Every registry event on the broker, as ``headwater up`` would restore them from the lake."""
    out: list[tuple[bytes | None, dict[str, Any]]] = []
    with EventConsumer(settings, serde, ["models"], name="test-copy-models") as consumer:
        wait_for(
            lambda: out.extend((e.key, e.record) for e in consumer.poll(500, 0.2)) or consumer.caught_up(),
            20,
            "the models topic to be read",
        )
    return out


def _restart(broker: EmbeddedBroker, settings: Settings, serde: Serde, models: list[Any]) -> float:
    """Start the data directory's broker again with its topics and registry; returns when it
    was ready (time.monotonic)."""
    info = broker.start()
    TopicCatalog(settings).create_all(AdminClient({"bootstrap.servers": info.bootstrap}))
    with EventProducer(settings, serde) as producer:
        for key, record in models:
            producer.send("models", record, key=key.decode() if key else None)
    return time.monotonic()


def _serve(settings: Settings, spec: ModelSpec, artifact: bytes, pipeline: ModelPipeline) -> ServerThread:
    """Topics, a registered model, features online, and a server started on them."""
    TopicCatalog(settings).create_all(AdminClient(client_config(settings)))
    register(settings, spec, artifact)
    seed_online_store(settings, feature_values(pipeline, 5), time.time_ns() // 1_000_000)
    thread = ServerThread(settings)
    thread.start()
    return thread


def test_the_service_follows_a_restarted_broker_at_the_same_and_at_a_new_address(
    *,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
    serde: Serde,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = time.monotonic()
    port = free_port()
    # No bootstrap_servers: every client finds the data directory's broker in run/broker.json.
    settings = load_settings(
        data_dir=tmp_path / "data",
        broker={"port": port},
        serving={"port": 0, "metrics_port": 0, "client_rate_limit": 0.0},
    )
    broker = EmbeddedBroker(settings)
    broker.start()
    thread: ServerThread | None = None
    stop = threading.Event()
    answered: list[int] = []
    errors: list[BaseException] = []
    caller: threading.Thread | None = None
    try:
        thread = _serve(settings, ctr_spec, artifacts[0], pipelines[0])
        assert thread.info is not None
        target, events = thread.info.target, thread.server.events
        assert events is not None

        def calls() -> None:
            with PredictionClient(target) as client:
                while not stop.is_set():
                    try:
                        answer = client.predict(MODEL, {"user_id": USERS[0], "item_id": ITEMS[0]})
                        answered.append(answer[0].model_version)
                    except BaseException as exc:
                        errors.append(exc)
                    stop.wait(0.005)

        caller = threading.Thread(target=calls)
        caller.start()
        wait_for(lambda: events.sent > 20, 30, "events on the first broker")
        resumed: dict[str, float] = {}
        for case, new_port in (("same address", port), ("new address", free_port())):
            models = _models(settings, serde)
            broker.stop()
            calls_before = len(answered)
            wait_for(lambda n=calls_before: len(answered) > n + 50, 30, "calls answered with the broker down")
            broker_settings = settings.broker.model_copy(update={"port": new_port})
            settings = settings.model_copy(update={"broker": broker_settings})
            broker = EmbeddedBroker(settings)
            sent_before = events.sent
            ready = _restart(broker, settings, serde, models)
            wait_for(
                lambda s=sent_before: events.sent > s + 20,
                RESUME_WITHIN_S + 30,
                f"events after a restart ({case})",
            )
            resumed[case] = time.monotonic() - ready
        with capfd.disabled():
            print(f"\nprediction events resumed after a broker restart in: {resumed}")
        assert all(seconds < RESUME_WITHIN_S for seconds in resumed.values()), resumed

        # The registry is followed on the new broker: a promotion there reaches the service.
        with Registry(settings, actor="tests") as registry:
            v2 = registry.register(
                MODEL,
                artifacts[1],
                feature_refs=list(ctr_spec.features),
                metadata={"spec": ctr_spec.model_dump(mode="json")},
            )
            registry.promote(MODEL, v2.version, force=True, reason="tests: after the broker moved")
        wait_for(lambda: answered[-1] == v2.version, 30, "the version promoted on the new broker to serve")
        stop.set()
        caller.join(10)
        thread.stop()  # closing the event log flushes it
        thread = None
        assert errors == []  # every call was answered throughout
        assert events.backlog == 0 and events.sent + events.failed + events.dropped == events._submitted
        # Every event delivered since the last restart is on the new broker, once.
        got: list[Any] = []
        with EventConsumer(settings, serde, ["predictions"], name="test-after-restart") as consumer:
            wait_for(
                lambda: got.extend(e.record for e in consumer.poll(500, 0.2)) or consumer.caught_up(),
                30,
                "the new broker's prediction events",
            )
        assert len(got) == events.sent - sent_before
        assert len({r["prediction_id"] for r in got}) == len(got)
    finally:
        stop.set()
        if caller is not None:
            caller.join(10)
        if thread is not None:
            thread.stop()
        broker.stop()
    # What was lost is counted by reason, and logged as a few summary lines, not one per event.
    lost = events.losses()
    assert lost["broker"] > 0
    metrics = events.metrics
    for reason, n in lost.items():
        assert metrics.events_dropped.labels(reason)._value.get() == n, reason
    assert metrics.events_sent._value.get() == events.sent
    out = capfd.readouterr()
    log = out.out + out.err
    assert "delivery to" not in log
    # A line per producer replaced, at most one per restart: at a new address the sender needs a
    # new producer; at the same address librdkafka's own reconnect may resume the old one first.
    assert 1 <= len(re.findall(r"new producer \(", log)) <= 2
    summaries = [
        r.getMessage() for r in caplog.records if "prediction events lost in the last" in r.getMessage()
    ]
    assert 1 <= len(summaries) <= (time.monotonic() - started) / 10 + 2, summaries


def test_with_a_configured_address_a_broker_that_forgot_the_producer_is_noticed(
    *,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
    serde: Serde,
) -> None:
    """bootstrap_servers set (a cluster's fixed address): a broker back there without the
    idempotent producer's id is noticed by the stall rule (nothing delivered while it answers)."""
    port = free_port()
    base = load_settings(data_dir=tmp_path / "broker", broker={"port": port})
    broker = EmbeddedBroker(base)
    broker.start()
    thread: ServerThread | None = None
    try:
        settings = load_settings(
            data_dir=tmp_path / "data",
            bootstrap_servers=f"127.0.0.1:{port}",
            serving={"port": 0, "metrics_port": 0, "client_rate_limit": 0.0},
        )
        thread = _serve(settings, ctr_spec, artifacts[0], pipelines[0])
        assert thread.info is not None
        events = thread.server.events
        assert events is not None
        with PredictionClient(thread.info.target) as client:

            def call(n: int = 10) -> None:
                for _ in range(n):
                    client.predict(MODEL, {"user_id": USERS[1], "item_id": ITEMS[1]})

            call()
            wait_for(lambda: events.sent >= 10, 20, "events on the first broker")
            models = _models(settings, serde)
            broker.stop()
            call()
            ready = _restart(broker, settings, serde, models)
            sent = events.sent

            def resumed() -> bool:
                call(1)
                return events.sent > sent

            wait_for(resumed, RESUME_WITHIN_S, "events after the restart")
            print(f"\nresumed {time.monotonic() - ready:.1f}s after the broker was back")
    finally:
        if thread is not None:
            thread.stop()
        broker.stop()
