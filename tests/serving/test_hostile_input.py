"""Hostile input against the session's server: identifiers and requests of any size, thousands
of made-up model names. Each is refused with the right status and a short message; the event
sender lives on and logs the next calls; /metrics, the service's state and its messages stay
bounded."""

from __future__ import annotations

import random
import re
import string
import urllib.request
from typing import Any

import grpc
import pytest

from headwater.client import PredictionError
from serving.api.v1 import prediction_pb2 as pb
from serving.service import MAX_DETAILS_LENGTH
from tests.serving.conftest import ITEMS, MODEL, USERS, Served
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ENTITY = {"user_id": USERS[0], "item_id": ITEMS[0]}


def _metrics(served: Served) -> str:
    url = f"http://127.0.0.1:{served.info.metrics_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=5).read().decode())


def _refused(served: Served, request: Any) -> grpc.RpcError:
    with served.client() as client, pytest.raises(grpc.RpcError) as refused:
        client._call(request, timeout=30)
    return refused.value


def test_identifiers_and_requests_of_any_size_are_refused_and_the_event_sender_lives_on(
    served: Served,
) -> None:
    events = served.thread.server.events
    assert events is not None and events._sender is not None
    sender = events._sender.proc.pid
    limit = served.settings.serving.max_id_length
    huge = "u" * 2_000_000  # under gRPC's 4 MB request limit, far over any event's
    with served.client() as client:
        cases: dict[str, Any] = {
            "entities[0].keys": client.request(MODEL, [{**ENTITY, "user_id": huge}]),
            'key_columns["item_id"][1]': client.request(
                MODEL, [ENTITY, {**ENTITY, "item_id": "i" * (limit + 1)}], columnar=True
            ),
            "client_id": client.request(MODEL, [ENTITY], client_id=huge),
            "trace_id": client.request(MODEL, [ENTITY], trace_id="t" * (limit + 1)),
            "experiment_id": client.request(MODEL, [ENTITY], experiment_id=huge),
            "model": client.request("m" * 100_000, [ENTITY]),
        }
        for field, request in cases.items():
            error = _refused(served, request)
            details = error.details() or ""
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, details)
            assert details.startswith(field) and "characters" in details and len(details) < 300, details
        # Exactly at the limit is accepted.
        (answer,) = client.predict(MODEL, {**ENTITY, "user_id": "u" * limit}, trace_id="t" * limit)
        assert answer.model_version == 1
        # Over gRPC's own message limit: refused by gRPC before the handler.
        error = _refused(served, client.request(MODEL, [{**ENTITY, "user_id": "u" * 5_000_000}]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Error details quoting client text are cut: a key column named twice, 100,000 characters.
        twice = pb.PredictRequest(model=MODEL)
        for _ in range(2):
            twice.key_columns.add(name="k" * 100_000, values=["1"])
        error = _refused(served, twice)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(error.details() or "") <= MAX_DETAILS_LENGTH and "more characters" in (
            error.details() or ""
        )
        sent = events.sent
        for _ in range(5):
            client.predict(MODEL, ENTITY)
    wait_for(lambda: events.sent >= sent + 5, 20, "the events of the calls after them")
    assert events._sender is not None and events._sender.proc.pid == sender  # never restarted
    assert events.losses()["sender"] == 0 and events.losses()["too_large"] == 0


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("headwater_serving_"))


def test_made_up_model_names_keep_the_metrics_the_state_and_the_log_bounded(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(7)
    with served.client() as client:
        with pytest.raises(PredictionError):
            client.predict("warm_up_unknown", ENTITY)  # the one "unknown" series exists from here
        before = _metrics(served)
        caplog.clear()
        names = ["".join(rng.choices(string.ascii_lowercase, k=24)) for _ in range(5_000)]
        codes: dict[str, int] = {}
        for start in range(0, len(names), 16):  # 16 at a time: under the queue of calls waiting
            calls = [
                client._call.future(client.request(name, [ENTITY]), timeout=30)
                for name in names[start : start + 16]
            ]
            for call in calls:
                try:
                    call.result()
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                    assert len(exc.details() or "") <= MAX_DETAILS_LENGTH
                codes[code] = codes.get(code, 0) + 1
    assert codes == {"NOT_FOUND": 5_000}
    assert len([r for r in caplog.records if r.name.startswith("serving")]) <= 5  # no line per call
    after = _metrics(served)
    # No series per name: none of the names shows, and the count of series does not grow with
    # them (a session's server may meanwhile add a label set of its own, e.g. a status another
    # test's call ended with: a histogram's ~20 lines, not 5,000 of them).
    assert not any(name in after for name in names)
    assert _series(after) - _series(before) < 100
    assert len(after) < len(before) + 2_000  # counts grow by digits, not by series
    unknown = re.search(
        r'headwater_serving_request_seconds_count\{model="unknown",status="NOT_FOUND",version=""\} (\S+)',
        after,
    )
    assert unknown is not None and float(unknown.group(1)) >= 5_001
    service = served.thread.server.service
    assert service is not None and len(service._refs) <= 10_000
