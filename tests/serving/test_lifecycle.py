"""Dedicated servers: hot swap under load, a failed load, shadows, a dead broker, overload, auth, TLS."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from features.repository import FeatureRepository
from headwater.client import PredictionClient, PredictionError
from headwater.settings import Settings
from models.artifact import dump_pipeline
from models.pipeline import ModelPipeline
from models.spec import ModelSpec
from registry.registry import Registry
from registry.state import ModelVersion
from serving.server import ServerThread
from streams.broker import EmbeddedBroker
from streams.consumer import EventConsumer
from streams.serde import Serde
from tests.serving.conftest import (
    ITEMS,
    MODEL,
    USERS,
    Served,
    at_once,
    feature_values,
    offline_rows,
    register,
    seed_online_store,
    serving_settings,
    start_served,
    training_frame,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ENTITY = {"user_id": USERS[0], "item_id": ITEMS[0]}


def test_hot_swap_under_load_fails_no_request(
    *,
    broker_settings: Settings,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
) -> None:
    settings = serving_settings(broker_settings, tmp_path, client_rate_limit=0.0)
    served = start_served(settings, ctr_spec, artifacts[0], pipelines[0])
    stop = threading.Event()
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def load(out: list[int]) -> None:
        with served.client() as client:
            while not stop.is_set():
                try:
                    out.append(
                        client.predict(MODEL, [ENTITY, {**ENTITY, "item_id": ITEMS[1]}])[0].model_version
                    )
                except BaseException as exc:
                    errors.append(exc)

    workers = [threading.Thread(target=load, args=(out,)) for out in seen]
    try:
        for w in workers:
            w.start()
        wait_for(lambda: all(len(s) > 20 for s in seen), 30, "requests on version 1")
        register(settings, ctr_spec, artifacts[1])  # v2, promoted to production while calls run
        wait_for(
            lambda: all(s and s[-1] == 2 and len(s) > s.index(2) + 20 for s in seen),
            30,
            "requests answered by version 2",
        )
    finally:
        stop.set()
        for w in workers:
            w.join(10)
        served.thread.stop()
    assert errors == []
    for versions in seen:  # each client saw 1s, then 2s: no flapping back
        switch = versions.index(2)
        assert set(versions[:switch]) == {1} and set(versions[switch:]) == {2}


def test_a_failed_load_keeps_the_old_version_and_raises_an_alert(
    *,
    broker_settings: Settings,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
    serde: Serde,
) -> None:
    settings = serving_settings(broker_settings, tmp_path, client_rate_limit=0.0)
    served = start_served(settings, ctr_spec, artifacts[0], pipelines[0])
    try:
        v2 = register(settings, ctr_spec, artifacts[1], alias=None)
        path = Path(v2.artifact_uri.removeprefix("file://"))
        path.write_bytes(path.read_bytes()[:-10] + b"tampered!!")  # the registry's sha256 no longer matches
        with Registry(settings, actor="tests") as registry:
            registry.promote(MODEL, v2.version, force=True, reason="tests: a tampered artifact")
        runtime = served.thread.server.runtime
        assert runtime is not None
        wait_for(lambda: runtime.failure(MODEL, 2) is not None, 20, "the load of version 2 to fail")
        assert "sha256" in (runtime.failure(MODEL, 2) or "")
        with served.client() as client:
            assert client.predict(MODEL, ENTITY)[0].model_version == 1  # the old version still serves
            with pytest.raises(PredictionError) as refused:
                client.predict(f"{MODEL}:2", ENTITY)
            assert refused.value.code == "UNAVAILABLE" and "sha256" in refused.value.details
        alerts: list[dict[str, Any]] = []
        with EventConsumer(settings, serde, ["alerts"], name="test-alerts") as consumer:
            wait_for(
                lambda: alerts.extend(e.record for e in consumer.poll(100, 0.2)) or bool(alerts),
                20,
                "the model_load_failed alert",
            )
        (alert,) = alerts
        assert alert["kind"] == "model_load_failed" and alert["subject"] == f"{MODEL}:2"
        assert alert["source"] == "serving" and alert["severity"] == "CRITICAL"
        metrics = served.thread.server.metrics
        assert metrics.model_load_failures.labels(MODEL, "2")._value.get() == 1
    finally:
        served.thread.stop()


def test_a_restarted_service_falls_back_to_the_newest_loadable_earlier_version(
    *,
    broker_settings: Settings,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    repository: FeatureRepository,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
    serde: Serde,
) -> None:
    """production moved 1 -> 2 -> 3, then the artifacts of 3 and 2 were corrupted: a service
    starting now serves 1 (the newest earlier version that passes its sha256 check), with a
    CRITICAL alert, instead of serving nothing."""
    settings = serving_settings(broker_settings, tmp_path, client_rate_limit=0.0)
    third = dump_pipeline(ModelPipeline(ctr_spec, repository).fit(training_frame(ctr_spec, repository, 3)))
    versions = [register(settings, ctr_spec, artifact) for artifact in (artifacts[0], artifacts[1], third)]
    for mv in versions[1:]:
        path = Path(mv.artifact_uri.removeprefix("file://"))
        path.write_bytes(path.read_bytes()[:-10] + b"corrupted!")
    values = feature_values(pipelines[0], 5)
    seed_online_store(settings, values, 1_700_000_000_000)
    thread = ServerThread(settings)
    try:
        info = thread.start()
        assert info.models == (f"{MODEL}@production -> 1",)
        with PredictionClient(info.target) as client:
            (answer,) = client.predict(MODEL, ENTITY)
        assert answer.model_version == 1
        served = Served(settings, info, thread, values, 1_700_000_000_000, versions[0])
        (want,) = pipelines[0].predict(offline_rows(served, pipelines[0], [(USERS[0], ITEMS[0])], 0))
        assert answer.score == pytest.approx(want.score, rel=1e-12)
        alerts: list[dict[str, Any]] = []
        with EventConsumer(settings, serde, ["alerts"], name="test-fallback-alerts") as consumer:
            wait_for(
                lambda: alerts.extend(e.record for e in consumer.poll(100, 0.2)) or len(alerts) >= 3,
                20,
                "the alerts",
            )
        by_kind = {(a["kind"], a["subject"]): a for a in alerts}
        assert set(by_kind) == {
            ("model_load_failed", f"{MODEL}:3"),
            ("model_load_failed", f"{MODEL}:2"),
            ("model_fallback", f"{MODEL}@production"),
        }
        fallback = by_kind[("model_fallback", f"{MODEL}@production")]
        assert fallback["severity"] == "CRITICAL" and fallback["labels"] == {
            "model": MODEL,
            "alias": "production",
            "failed_version": "3",
            "serving_version": "1",
        }
        assert "sha256" in fallback["message"]
        metrics = thread.server.metrics
        assert metrics.model_serving.labels(f"{MODEL}@production")._value.get() == 1
    finally:
        thread.stop()


def test_a_shadow_scores_the_same_requests_and_logs_its_own_events(
    *,
    broker_settings: Settings,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
    serde: Serde,
) -> None:
    settings = serving_settings(broker_settings, tmp_path, client_rate_limit=0.0)
    served = start_served(settings, ctr_spec, artifacts[0], pipelines[0])
    try:
        v2: ModelVersion = register(settings, ctr_spec, artifacts[1], alias=None)
        with Registry(settings, actor="tests") as registry:
            registry.attach_shadow(MODEL, "production", v2.version)
        runtime = served.thread.server.runtime
        assert runtime is not None
        wait_for(lambda: bool(runtime.routes.shadows.get((MODEL, "production"))), 20, "the shadow to load")
        with served.client() as client:
            (answer,) = client.predict(MODEL, ENTITY, request_features={"position": 2}, trace_id="shadowed")
        assert answer.model_version == 1  # clients never see the shadow
        events: dict[bool, dict[str, Any]] = {}
        with EventConsumer(settings, serde, ["predictions"], name="test-shadow") as consumer:

            def both() -> bool:
                for e in consumer.poll(200, 0.2):
                    if e.record["trace_id"] == "shadowed":
                        events[e.record["shadow"]] = e.record
                return len(events) == 2

            wait_for(both, 20, "the primary's and the shadow's events")
        assert events[False]["model_version"] == 1 and events[False]["prediction_id"] == answer.prediction_id
        assert events[True]["model_version"] == 2 and events[True]["prediction_id"] != answer.prediction_id
        (want,) = pipelines[1].predict(offline_rows(served, pipelines[1], [(USERS[0], ITEMS[0])], 2))
        assert events[True]["score"] == pytest.approx(want.score, rel=1e-12)
    finally:
        served.thread.stop()


def test_requests_are_answered_with_the_broker_down_and_drops_are_counted(
    tmp_path: Path, ctr_spec: ModelSpec, artifacts: list[bytes], pipelines: list[ModelPipeline]
) -> None:
    base = Settings(data_dir=tmp_path / "broker")
    broker = EmbeddedBroker(base)
    info = broker.start()
    try:
        own = base.model_copy(update={"bootstrap_servers": info.bootstrap})
        settings = serving_settings(own, tmp_path / "data", client_rate_limit=0.0, event_buffer=50)
        mv = register(settings, ctr_spec, artifacts[0])
        from tests.serving.conftest import feature_values, seed_online_store

        seed_online_store(settings, feature_values(pipelines[0], 5), 1_700_000_000_000)
        thread = ServerThread(settings, event_producer_config={"queue.buffering.max.messages": 10})
        served_info = thread.start()
        with PredictionClient(served_info.target) as client:
            assert client.predict(MODEL, ENTITY)[0].model_version == mv.version
            broker.stop()
            answered = [client.predict(MODEL, [ENTITY] * 20) for _ in range(20)]  # 400 events to log
        assert all(len(a) == 20 and a[0].model_version == mv.version for a in answered)
        events = thread.server.events
        assert events is not None
        wait_for(lambda: events.dropped + events.failed > 0, 20, "dropped events to be counted")
        assert thread.server.metrics.events_dropped.labels("buffer_full")._value.get() == events.dropped
    finally:
        broker.stop()
    thread.stop(30)


def test_rate_limit_and_in_flight_bound_answer_resource_exhausted(
    *,
    broker_settings: Settings,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
) -> None:
    settings = serving_settings(
        broker_settings, tmp_path, client_rate_limit=1.0, client_burst=3, max_in_flight=1
    )
    served = start_served(settings, ctr_spec, artifacts[0], pipelines[0])
    try:
        with served.client() as client:
            outcomes = []
            for _ in range(8):
                try:
                    client.predict(MODEL, ENTITY, client_id="greedy")
                    outcomes.append("OK")
                except PredictionError as exc:
                    outcomes.append(exc.code)
                    assert "greedy" in exc.details and "rate limit" in exc.details
            assert outcomes[:3] == ["OK"] * 3 and outcomes.count("RESOURCE_EXHAUSTED") >= 4
            assert client.predict(MODEL, ENTITY, client_id="polite")[0].model_version == 1  # per client
            # Large calls are scored off the event loop, so several are in flight at once: past one, refused.
            big = [{"user_id": USERS[i % 20], "item_id": ITEMS[i % 30]} for i in range(1000)]
            answers = at_once(served, [client.request(MODEL, big, client_id=f"c{i}") for i in range(8)], 30)
        codes = [code for code, _ in answers]
        assert all("in flight" in details for code, details in answers if code != "OK")
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes
        shed = served.thread.server.metrics.shed
        assert shed.labels("rate_limit")._value.get() >= 4 and shed.labels("in_flight")._value.get() >= 1
    finally:
        served.thread.stop()


def test_token_authentication_and_tls(
    *,
    broker_settings: Settings,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per line\nsecret-1\n")
    settings = serving_settings(
        broker_settings,
        tmp_path / "data",
        client_rate_limit=0.0,
        auth_tokens_file=tokens,
        tls_cert_file=cert,
        tls_key_file=key,
    )
    served = start_served(settings, ctr_spec, artifacts[0], pipelines[0])
    target = f"localhost:{served.info.port}"
    try:
        assert served.info.tls
        with PredictionClient(target, root_certificates=cert.read_bytes(), token="secret-1") as client:
            assert client.predict(MODEL, ENTITY)[0].model_version == 1
        for token in (None, "wrong"):
            with PredictionClient(target, root_certificates=cert.read_bytes(), token=token) as client:
                with pytest.raises(PredictionError) as refused:
                    client.predict(MODEL, ENTITY)
                assert refused.value.code == "UNAUTHENTICATED" and "Bearer" in refused.value.details
        with (
            PredictionClient(target, token="secret-1") as plaintext,
            pytest.raises(PredictionError) as refused,
        ):
            plaintext.predict(MODEL, ENTITY, timeout=5)
        assert refused.value.code == "UNAVAILABLE"  # no TLS, no answer
    finally:
        served.thread.stop()
