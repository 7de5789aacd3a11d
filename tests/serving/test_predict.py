"""Predict against the real server: outputs equal the offline pipeline's, events, bad input, operations."""

from __future__ import annotations

import math
import re
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from features.repository import FeatureRepository
from headwater.client import PredictionClient, PredictionError, PredictionResult
from models.artifact import dump_pipeline
from models.pipeline import ModelPipeline
from models.spec import ModelSpec
from serving.api.v1 import SERVICE_NAME, prediction_pb2, prediction_pb2_grpc
from serving.events import named_features
from serving.online_store import open_online_store
from streams.consumer import EventConsumer
from streams.serde import Serde
from tests.serving.conftest import ITEMS, MODEL, USERS, Served, offline_rows, register, training_frame
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("columnar", [False, True], ids=["entities", "key_columns"])
def test_predictions_equal_the_offline_pipeline(
    served: Served, pipelines: list[ModelPipeline], columnar: bool
) -> None:
    pairs = [(USERS[u], ITEMS[i]) for u in (0, 1) for i in range(12)]
    with served.client() as client:
        results = client.predict(
            MODEL,
            [{"user_id": u, "item_id": i} for u, i in pairs],
            request_features={"position": 2},
            columnar=columnar,
        )
        single = client.predict(
            MODEL, {"user_id": USERS[3], "item_id": ITEMS[4]}, request_features={"position": 3}
        )
    expected = pipelines[0].predict(offline_rows(served, pipelines[0], pairs, 2))
    assert len(results) == len(pairs)
    for got, want in zip(results, expected, strict=True):
        assert got.model_name == MODEL and got.model_version == 1
        assert got.score is not None and want.score is not None
        assert math.isclose(got.score, want.score, rel_tol=1e-12)
        assert got.label == want.label
        assert got.ranked_items == want.ranked_items  # top 10 items of the user, by score
        assert got.defaulted_features == []
        assert got.feature_age_ms is not None and got.feature_age_ms >= 60_000
    assert len({r.prediction_id for r in results}) == len(results)
    (want_single,) = pipelines[0].predict(offline_rows(served, pipelines[0], [(USERS[3], ITEMS[4])], 3))
    assert single[0].score == pytest.approx(want_single.score, rel=1e-12)


def test_missing_features_take_the_default_and_are_flagged(
    served: Served, pipelines: list[ModelPipeline]
) -> None:
    with served.client() as client:
        (result,) = client.predict(MODEL, {"user_id": "nobody", "item_id": ITEMS[0]})  # no position either
    assert "user_activity:clicks_24h" in result.defaulted_features
    assert "position" in result.defaulted_features
    assert not any(f.startswith("item_activity:") for f in result.defaulted_features)
    (row,) = offline_rows(served, pipelines[0], [("nobody", ITEMS[0])], 0)
    del row["position"]  # the offline pipeline sees the same missing values: the same defaults apply
    (want,) = pipelines[0].predict([row])
    assert result.score == pytest.approx(want.score, rel=1e-12)


def test_both_forms_of_a_request_get_the_same_answers(served: Served) -> None:
    """Entities one message each, or keys column-wise (one user's value for all its items):
    the same scores, labels, rankings, versions, defaults and ages, in the same order."""
    entities = [{"user_id": USERS[2], "item_id": i} for i in (*ITEMS[:6], "no-such-item")]
    with served.client() as client:
        rows = client.predict(MODEL, entities, request_features={"position": 4}, columnar=False)
        request = client.request(MODEL, [], request_features={"position": 4})
        request.key_columns.add(name="item_id", values=[e["item_id"] for e in entities])
        request.key_columns.add(name="user_id", values=[USERS[2]])  # one value for every entity
        answer = client._call(request, timeout=10)
    assert not answer.predictions and len(answer.columns.prediction_ids) == len(entities)
    columns = PredictionClient._columns(answer.columns)

    def comparable(r: PredictionResult) -> tuple[Any, ...]:
        return (r.model_name, r.model_version, r.score, r.label, r.ranked_items, r.defaulted_features)

    assert [comparable(r) for r in columns] == [comparable(r) for r in rows]
    assert [r.feature_age_ms is None for r in columns] == [r.feature_age_ms is None for r in rows]
    assert columns[-1].defaulted_features and columns[-1].feature_age_ms is not None  # the user was found
    assert len({r.prediction_id for r in [*rows, *columns]}) == 2 * len(entities)
    # The client itself sends the user's key once, and gets the same answers.
    with served.client() as client:
        sent = client.request(MODEL, entities, request_features={"position": 4})
        assert {c.name: len(c.values) for c in sent.key_columns} == {"user_id": 1, "item_id": len(entities)}
        assert [comparable(r) for r in client.predict(MODEL, entities, request_features={"position": 4})] == [
            comparable(r) for r in rows
        ]
        # The same entity twice is two entities: its keys are not collapsed to one.
        twice = client.predict(MODEL, [entities[0], entities[0]], request_features={"position": 4})
        assert [(r.score, r.label) for r in twice] == [(rows[0].score, rows[0].label)] * 2


def test_an_item_updated_between_calls_is_scored_on_its_new_values(
    served: Served, pipelines: list[ModelPipeline]
) -> None:
    """The service keeps the rows it decoded (hot items are read by every call), never past a write."""
    item_names = pipelines[0].reads["item_activity"]
    user_values = served.values["user_activity"][USERS[0]]
    with served.client() as client, open_online_store(served.settings) as store:
        for k, value in enumerate((3.0, 11.0, 3.0)):
            values = {name: value + i for i, name in enumerate(item_names)}
            store.put_batch("item_activity", [("updated-item", served.event_time_ms + k, values)])
            got = client.predict(
                MODEL,
                [{"user_id": USERS[0], "item_id": "updated-item"}] * 3,
                request_features={"position": 1},
            )
            row = {
                "user_id": USERS[0],
                "item_id": "updated-item",
                "position": 1,
                **{f"user_activity:{n}": v for n, v in user_values.items()},
                **{f"item_activity:{n}": v for n, v in values.items()},
            }
            (want,) = pipelines[0].predict([row])
            assert [r.score for r in got] == [pytest.approx(want.score, rel=1e-12)] * 3, k


def test_a_version_by_number_and_by_alias(served: Served) -> None:
    with served.client() as client:
        by_version = client.predict(f"{MODEL}:1", {"user_id": USERS[0], "item_id": ITEMS[0]})
        by_alias = client.predict(f"{MODEL}@production", {"user_id": USERS[0], "item_id": ITEMS[0]})
    assert by_version[0].model_version == by_alias[0].model_version == 1
    assert by_version[0].score == by_alias[0].score


@pytest.mark.parametrize(
    ("model", "entities", "features", "code", "names"),
    [
        (
            "no_such_model",
            [{"user_id": "u", "item_id": "1"}],
            {},
            "NOT_FOUND",
            ["no_such_model", "ctr_model"],
        ),
        (f"{MODEL}@staging", [{"user_id": "u", "item_id": "1"}], {}, "NOT_FOUND", ["staging", "production"]),
        (f"{MODEL}:99", [{"user_id": "u", "item_id": "1"}], {}, "NOT_FOUND", ["version 99"]),
        ("Bad Ref!", [{"user_id": "u", "item_id": "1"}], {}, "INVALID_ARGUMENT", ["model"]),
        ("", [{"user_id": "u", "item_id": "1"}], {}, "INVALID_ARGUMENT", ["model"]),
        (MODEL, [{"user_id": "u"}], {}, "INVALID_ARGUMENT", ["entities[0].keys", "item_id"]),
        (
            MODEL,
            [{"user_id": "u", "item_id": "1"}, {"item_id": "2", "user_id": ""}],
            {},
            "INVALID_ARGUMENT",
            ["entities[1].keys", "user_id"],
        ),
        (
            MODEL,
            [{"user_id": "u", "item_id": "1"}],
            {"position": "top"},
            "INVALID_ARGUMENT",
            ['request_features["position"]', "number"],
        ),
        (MODEL, [], {}, "INVALID_ARGUMENT", ["entities"]),
        (
            MODEL,
            [{"user_id": "u", "item_id": "1"}] * 1001,
            {},
            "INVALID_ARGUMENT",
            ["entities", "1001", "1000"],
        ),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    *,
    served: Served,
    model: str,
    entities: list[dict[str, str]],
    features: dict[str, Any],
    code: str,
    names: list[str],
) -> None:
    with served.client() as client, pytest.raises(PredictionError) as refused:
        client.predict(model, entities, request_features=features, columnar=False)
    assert refused.value.code == code
    for name in names:
        assert name in refused.value.details


@pytest.mark.parametrize(
    ("columns", "names"),
    [
        ({"user_id": ["u", "v"]}, ["key_columns", "item_id", "user_id, item_id"]),
        ({"user_id": ["u", "v"], "item_id": ["1", "2", "3"]}, ['key_columns["user_id"]', "2 values", "3"]),
        ({"user_id": ["u"], "item_id": ["1", ""]}, ['key_columns["item_id"][1]', "empty"]),
        ({"user_id": [], "item_id": []}, ["entities", "none given"]),
        ({"user_id": ["u"], "item_id": ["1"] * 1001}, ["entities", "1001", "1000"]),
    ],
)
def test_bad_key_columns_are_refused_naming_the_field(
    served: Served, columns: dict[str, list[str]], names: list[str]
) -> None:
    with served.client() as client:
        request = client.request(MODEL, [])
        for name, values in columns.items():
            request.key_columns.add(name=name, values=values)
        with pytest.raises(grpc.RpcError) as refused:
            client._call(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name in names:
        assert name in (refused.value.details() or "")


def test_a_request_with_both_forms_or_a_column_twice_is_refused(served: Served) -> None:
    with served.client() as client:
        both = client.request(MODEL, [{"user_id": "u", "item_id": "1"}], columnar=False)
        both.key_columns.add(name="user_id", values=["u"])
        twice = client.request(MODEL, [{"user_id": "u", "item_id": "1"}] * 2, columnar=True)
        twice.key_columns.add(name="user_id", values=["v", "w"])
        for request, words in ((both, "both given"), (twice, "'user_id' given twice")):
            with pytest.raises(grpc.RpcError) as refused:
                client._call(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in (refused.value.details() or "")


def test_a_wrong_type_per_entity_names_the_entity(served: Served) -> None:
    with served.client() as client, pytest.raises(PredictionError) as refused:
        client.predict(MODEL, [{"user_id": "u", "item_id": "1"}] * 2, entity_features=[{}, {"position": "x"}])
    assert refused.value.code == "INVALID_ARGUMENT"
    assert 'entities[1].features["position"]' in refused.value.details


def test_a_passed_deadline_answers_deadline_exceeded(served: Served) -> None:
    """timeout_ms is the server's budget: 1 ms cannot score 1,000 entities; no answer is sent."""
    with served.client() as client:
        request = client.request(
            MODEL, [{"user_id": USERS[i % 20], "item_id": ITEMS[i % 30]} for i in range(1000)], timeout_ms=1
        )
        with pytest.raises(grpc.RpcError) as refused:
            client._call(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_prediction_events_carry_what_was_decided(
    served: Served, serde: Serde, pipelines: list[ModelPipeline]
) -> None:
    with served.client() as client:
        results = client.predict(
            MODEL,
            [{"user_id": USERS[5], "item_id": ITEMS[7]}, {"user_id": "ghost", "item_id": ITEMS[8]}],
            request_features={"position": 1},
            client_id="events-test",
            trace_id="trace-1",
        )
    wanted = {r.prediction_id: r for r in results}
    found: dict[str, dict[str, Any]] = {}
    with EventConsumer(served.settings, serde, ["predictions"], name="test-events") as consumer:

        def collected() -> bool:
            for event in consumer.poll(500, 0.2):
                if event.record["prediction_id"] in wanted:
                    found[event.record["prediction_id"]] = event.record
            return len(found) == len(wanted)

        wait_for(collected, 20, "the prediction events of the call")
    first, second = (found[r.prediction_id] for r in results)
    assert first["model_name"] == MODEL and first["model_version"] == 1 and first["model_ref"] == MODEL
    assert first["entity_key"] == f"{USERS[5]}|{ITEMS[7]}"
    assert first["client_id"] == "events-test" and first["trace_id"] == "trace-1"
    assert first["score"] == pytest.approx(results[0].score)
    assert first["ranked_items"] == results[0].ranked_items
    assert first["experiment_id"] is None and first["variant"] is None and first["propensity"] is None
    assert first["shadow"] is False and first["latency_us"] > 0
    # v2 events hold the input row positionally: the model version's columns name it.
    columns = pipelines[0].columns
    assert first["features"] == [] and len(first["feature_values"]) == len(columns)
    features = named_features(first, columns)
    assert (
        features["user_activity:clicks_24h"]["value"]
        == served.values["user_activity"][USERS[5]]["clicks_24h"]
    )
    assert features["user_activity:clicks_24h"]["event_time"] == served.event_time_ms
    assert features["position"] == {"value": 1.0, "event_time": None, "defaulted": False}
    assert not any(f["defaulted"] for f in features.values())
    # Replay: the same inputs through the version's pipeline give these values and this score.
    (row,) = offline_rows(served, pipelines[0], [(USERS[5], ITEMS[7])], 1)
    assert first["feature_values"] == pipelines[0].assemble([row])[0][0].tolist()
    assert first["score"] == pytest.approx(pipelines[0].predict([row])[0].score, rel=1e-12)
    ghost = named_features(second, columns)
    assert ghost["user_activity:clicks_24h"]["defaulted"] is True
    assert ghost["user_activity:clicks_24h"]["event_time"] is None
    assert ghost["item_activity:clicks_24h"]["event_time"] == served.event_time_ms


def test_health_and_reflection_answer_grpc_clients(served: Served) -> None:
    with grpc.insecure_channel(served.info.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        listed, described = list(reflect.ServerReflectionInfo(iter(requests), timeout=5))
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        assert described.file_descriptor_response.file_descriptor_proto  # the .proto, for grpcurl
        # The generated stub works as any other language's would.
        stub = prediction_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(
            prediction_pb2.PredictRequest(
                model=MODEL, entities=[prediction_pb2.Entity(keys={"user_id": USERS[0], "item_id": ITEMS[0]})]
            ),
            timeout=5,
        )
        assert response.predictions[0].model_version == 1


def _metrics(served: Served) -> str:
    url = f"http://127.0.0.1:{served.info.metrics_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=5).read().decode())


def _entities_scored(served: Served) -> float:
    found = re.search(
        r'headwater_serving_entities_total\{model="ctr_model",version="1"\} (\S+)', _metrics(served)
    )
    return float(found.group(1)) if found else 0.0


def test_metrics_are_served(served: Served) -> None:
    before = _entities_scored(served)
    with served.client() as client:
        client.predict(MODEL, {"user_id": USERS[0], "item_id": ITEMS[0]})
        # Both forms of a batch count their entities: one message each, and column-wise.
        pairs = [{"user_id": USERS[1], "item_id": item} for item in ITEMS[:3]]
        client.predict(MODEL, pairs, columnar=False)
        client.predict(MODEL, pairs, columnar=True)
    assert _entities_scored(served) - before == 7
    text = _metrics(served)
    for name in (
        'headwater_serving_request_seconds_bucket{le="0.005",model="ctr_model",status="OK",version="1"}',
        'headwater_serving_feature_fetch_seconds_count{feature_set="user_activity"}',
        "headwater_serving_in_flight",
        "headwater_serving_shed_total",
        'headwater_serving_model_loads_total{model="ctr_model",version="1"}',
        "headwater_serving_event_backlog",
        "headwater_serving_events_dropped_total",
        'headwater_serving_model_version{ref="ctr_model@production"} 1.0',
    ):
        assert name in text, name


def test_precomputed_predictions_are_served_without_the_model(
    served: Served, ctr_spec: ModelSpec, repository: FeatureRepository, pipelines: list[ModelPipeline]
) -> None:
    spec = ctr_spec.model_copy(update={"name": "ctr_batch", "serve_precomputed": True})
    pipeline = ModelPipeline(spec, repository).fit(training_frame(spec, repository, seed=1))
    register(served.settings, spec, dump_pipeline(pipeline))
    runtime = served.thread.server.runtime
    assert runtime is not None
    wait_for(lambda: ("ctr_batch", "production") in runtime.routes.aliases, 30, "ctr_batch to load")
    with open_online_store(served.settings) as store:  # what batch inference writes
        store.put_batch(
            "predictions__ctr_batch",
            [
                (
                    USERS[1],
                    1_700_000_000_000,
                    {"score": 0.77, "ranked_items": '["5", "3"]', "model_version": 7},
                ),
            ],
        )
    with served.client() as client:
        stored, live = client.predict(
            "ctr_batch",
            [{"user_id": USERS[1], "item_id": ITEMS[0]}, {"user_id": USERS[2], "item_id": ITEMS[0]}],
        )
    assert (stored.score, stored.ranked_items, stored.model_version) == (0.77, ["5", "3"], 7)
    assert live.model_version == 1  # no batch prediction for this user: computed by the model
    (want,) = pipeline.predict(offline_rows(served, pipeline, [(USERS[2], ITEMS[0])], 0))
    assert live.score == pytest.approx(want.score, rel=1e-12)
