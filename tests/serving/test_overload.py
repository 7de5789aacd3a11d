"""Overload: three times what the server answers, from h2load (C, a process of its own: a
Python client needs as much CPU as the server).

What must hold: the calls the server takes are answered fast (no queue of the whole flood in
front of them: the asyncio server takes calls from gRPC's core one at a time, so that is where
they wait, and ``serving.max_queued_calls`` bounds it), the excess is refused at once and
counted (by gRPC's core past that queue; by the service with RESOURCE_EXHAUSTED past
``max_in_flight``), the server keeps answering at a good share of its capacity, and no call
answered other than OK leaves work behind (prediction events).

Capacity is measured first (closed loop, 16 calls at a time); then h2load sends three times
that rate for a few seconds, on schedule whatever the answers (open loop, as independent users
do), while a probe makes one call at a time and times each: h2load sees every gRPC answer as
HTTP 200, the probe knows which were answered. The same flood goes to a server without the
bound, on the same machine: the assertions are ratios between the two, or generous absolute
bounds, so that a loaded two-core machine does not fail them while a server that queues the
flood does. ``benchmarks/overload.py`` measures the same on a quiet machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from headwater.client import PredictionError
from headwater.settings import Settings
from models.pipeline import ModelPipeline
from models.spec import ModelSpec
from serving.api.v1 import prediction_pb2 as pb
from tests.serving.conftest import ITEMS, MODEL, USERS, Served, at_once, serving_settings, start_served
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

SECONDS, CONNECTIONS = 3, 8
QUEUE = 16


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def _h2load(
    served: Served, tmp: Path, *, rate: float | None = None, outstanding: int = 16
) -> tuple[int, int, list[tuple[str, float]]]:
    """Calls for SECONDS on CONNECTIONS connections: at ``rate`` calls/s in all (open loop:
    sent on schedule whatever the answers), else closed loop with ``outstanding`` at a time;
    one probe call at a time meanwhile. Returns the calls h2load started, those it saw answered
    (the rest were still queued when it closed its connections), and each probe call's status
    and milliseconds."""
    binary = shutil.which("h2load")
    assert binary is not None, "h2load not found: run `bash infra/setup.sh` (Debian's nghttp2-client)"
    request = pb.PredictRequest(model=MODEL, client_id="burst")
    request.entities.add().keys.update({"user_id": USERS[0], "item_id": ITEMS[0]})
    message = request.SerializeToString()
    body, log = tmp / "request.bin", tmp / "h2load.log"
    log.unlink(missing_ok=True)  # h2load appends
    body.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)  # a gRPC frame
    url = f"http://{served.info.target}/headwater.serving.v1.PredictionService/Predict"
    load = (
        ["--rps", f"{rate / CONNECTIONS:.0f}", "-m", "1000"]
        if rate
        else ["-m", str(outstanding // CONNECTIONS)]
    )
    flood = subprocess.Popen(
        [binary, "-D", str(SECONDS), "-c", str(CONNECTIONS), *load, "--log-file", str(log),
         "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers", url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    probe: list[tuple[str, float]] = []
    try:
        with served.client() as client:
            client.predict(MODEL, {"user_id": USERS[1], "item_id": ITEMS[1]})  # its channel is up
            while flood.poll() is None:
                started = time.perf_counter()
                try:
                    client.predict(MODEL, {"user_id": USERS[1], "item_id": ITEMS[1]}, timeout=30)
                    code = "OK"
                except PredictionError as exc:
                    code = exc.code
                probe.append((code, (time.perf_counter() - started) * 1e3))
    finally:
        output, _ = flood.communicate(timeout=60)
        assert flood.returncode == 0, output
    found = re.search(r"(\d+) started, (\d+) done", output)
    assert found is not None, output
    return int(found[1]), int(found[2]), probe


def _metrics(served: Served) -> dict[str, float]:
    """Predict calls by status, and refusals by gRPC's queue and by the in-flight bound."""
    url = f"http://127.0.0.1:{served.info.metrics_port}/metrics"
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        found = re.match(r'headwater_serving_request_seconds_count\{.*status="(\w+)".*\} (\S+)', line)
        if found:
            out[found[1]] = out.get(found[1], 0.0) + float(found[2])
        elif line.startswith(
            ("headwater_serving_refused_by_grpc_total ", 'headwater_serving_shed_total{reason="in_flight"}')
        ):
            out[line.split(" ")[0]] = float(line.rsplit(" ", 1)[1])
    return out


def _served(
    base: Settings, tmp: Path, spec: ModelSpec, artifact: bytes, pipeline: ModelPipeline, **serving: Any
) -> Served:
    settings = serving_settings(base, tmp, client_rate_limit=0.0, default_timeout_ms=0, **serving)
    return start_served(settings, spec, artifact, pipeline)


def _big_calls(served: Served, n: int) -> list[str]:
    """``n`` 1,000-entity calls at once (scored on worker threads: they stay in flight)."""
    entities = [{"user_id": USERS[i % 20], "item_id": ITEMS[i % 30]} for i in range(1_000)]
    with served.client() as client:
        requests = [client.request(MODEL, entities) for _ in range(n)]
    return [code for code, _ in at_once(served, requests)]


def test_three_times_capacity_is_shed_at_once_and_the_calls_taken_stay_fast(
    *,
    broker_settings: Settings,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
) -> None:
    bounded = _served(
        broker_settings,
        tmp_path / "b",
        ctr_spec,
        artifacts[0],
        pipelines[0],
        max_queued_calls=QUEUE,
        max_in_flight=2,
    )
    try:
        capacity = _h2load(bounded, tmp_path)[0] / SECONDS  # calls/s, closed loop with 16 at a time
        events = bounded.thread.server.events
        assert events is not None
        submitted, before = events._submitted, _metrics(bounded)
        calls, done, probe = _h2load(bounded, tmp_path, rate=3 * capacity)
        flood = {k: v - before.get(k, 0.0) for k, v in _metrics(bounded).items()}
        bigs = _big_calls(bounded, 8)
        wait_for(lambda: events.backlog == 0, 30, "the events of the calls answered")
        entities_logged = events._submitted - submitted
        after = _metrics(bounded)
    finally:
        bounded.thread.stop()
    unbounded = _served(
        broker_settings, tmp_path / "u", ctr_spec, artifacts[0], pipelines[0], max_queued_calls=100_000
    )
    try:
        before_unbounded = _metrics(unbounded).get("OK", 0.0)
        queued = [ms for code, ms in _h2load(unbounded, tmp_path, rate=3 * capacity)[2] if code == "OK"]
        unbounded_rate = (_metrics(unbounded).get("OK", 0.0) - before_unbounded) / SECONDS
    finally:
        unbounded.thread.stop()

    answered = [ms for code, ms in probe if code == "OK"]
    refused = [ms for code, ms in probe if code != "OK"]
    ok, refused_by_grpc = flood.get("OK", 0.0), flood["headwater_serving_refused_by_grpc_total"]
    print(
        f"\ncapacity {capacity:.0f} calls/s; at 3x for {SECONDS}s: {calls} calls, {ok / SECONDS:.0f}/s "
        f"answered, {refused_by_grpc:.0f} refused by gRPC's queue; probe: {len(answered)} answered, p99 "
        f"{_p99(answered):.1f} ms, {len(refused)} refused, p99 {_p99(refused or [0.0]):.1f} ms. Without the "
        f"bound: {unbounded_rate:.0f}/s answered, probe p99 {_p99(queued):.1f} ms ({len(queued)} calls). "
        f"Large calls: {bigs}"
    )
    # The excess was refused by gRPC's queue, and counted: every call h2load saw answered was
    # answered by the service (any status) or refused by the queue, and none twice (calls sent
    # but not yet read when h2load closed its connections are neither).
    statuses = sum(v for k, v in flood.items() if not k.startswith("headwater_"))
    assert refused_by_grpc > calls / 3
    # (streams refused by HTTP/2's per-connection bound are answered but in neither count).
    assert statuses + refused_by_grpc <= calls + len(probe)
    assert abs(statuses + refused_by_grpc - done - len(probe)) <= 2 * QUEUE
    assert {code for code, _ in probe} <= {"OK", "CANCELLED"} and len(answered) >= 10
    # What the server took was answered fast (no queue of the whole flood in front of it), and
    # refusing the excess cost it little: it answered nearly as many calls as a server that
    # queues them all (refused in Python, each would cost about half a call).
    assert _p99(answered) < 0.25 * _p99(queued) and _p99(answered) < 250.0
    assert ok / SECONDS > 0.6 * unbounded_rate
    # Large calls past the in-flight bound: RESOURCE_EXHAUSTED from the service, counted.
    assert bigs.count("RESOURCE_EXHAUSTED") >= 1 and bigs.count("OK") >= 2
    assert set(bigs) <= {"OK", "RESOURCE_EXHAUSTED"}
    shed = 'headwater_serving_shed_total{reason="in_flight"}'
    assert after[shed] - before.get(shed, 0.0) == bigs.count("RESOURCE_EXHAUSTED")
    # No work left behind by a call not answered: events for the entities answered, no more.
    assert entities_logged == ok + 1_000 * bigs.count("OK")
