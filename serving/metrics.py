"""Prometheus metrics of the prediction service, served on ``/metrics``.

Each server owns a :class:`ServingMetrics` with its own registry (several servers in one
test process never collide). Labelled children are looked up once per label set and cached:
``Histogram.labels(...)`` costs microseconds, which the request path does not have.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["RefusedByGrpc", "ServingMetrics", "grpc_server_ids"]

log = logging.getLogger(__name__)

# Latency buckets in seconds: sub-millisecond resolution where the service lives.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
_FETCH_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class ServingMetrics:
    """Every metric of the service, in one registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.request_latency = Histogram(
            "headwater_serving_request_seconds",
            "Server-side latency of Predict calls, by model, version and gRPC status",
            ["model", "version", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.feature_fetch = Histogram(
            "headwater_serving_feature_fetch_seconds",
            "Latency of one online-store batch read, by feature set",
            ["feature_set"],
            buckets=_FETCH_BUCKETS,
            registry=r,
        )
        self.entities = Counter(
            "headwater_serving_entities_total",
            "Entities scored, by model and version",
            ["model", "version"],
            registry=r,
        )
        self.defaulted = Counter(
            "headwater_serving_defaulted_features_total",
            "Feature values that were missing and took the spec's default, by model",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge("headwater_serving_in_flight", "Predict calls being answered", registry=r)
        self.shed = Counter(
            "headwater_serving_shed_total",
            "Calls refused before any work: in_flight (bound reached), rate_limit (client over its rate), "
            "deadline (expired on arrival)",
            ["reason"],
            registry=r,
        )
        self.model_loads = Counter(
            "headwater_serving_model_loads_total", "Model versions loaded", ["model", "version"], registry=r
        )
        self.model_load_failures = Counter(
            "headwater_serving_model_load_failures_total",
            "Model versions that failed to load (the previous one keeps serving)",
            ["model", "version"],
            registry=r,
        )
        self.model_serving = Gauge(
            "headwater_serving_model_version", "Version served per model reference", ["ref"], registry=r
        )
        self.event_backlog = Gauge(
            "headwater_serving_event_backlog",
            "Prediction events not delivered yet (queued here, in the sender process or in librdkafka)",
            registry=r,
        )
        self.events_sent = Counter(
            "headwater_serving_events_sent_total", "Prediction events the broker acknowledged", registry=r
        )
        self.events_dropped = Counter(
            "headwater_serving_events_dropped_total",
            "Prediction events that could not be logged, by reason: buffer_full (the sender is behind), "
            "broker (refused or not delivered), encode, too_large (over the producer's message.max.bytes), "
            "sender (held by a sender process that died)",
            ["reason"],
            registry=r,
        )
        self.shadow_skipped = Counter(
            "headwater_serving_shadow_skipped_total", "Requests not shadow-scored (queue full)", registry=r
        )
        self.refused_by_grpc = RefusedByGrpc()  # the server sets its server id and in-flight count
        r.register(self.refused_by_grpc)
        # Cached children of the hot-path metrics.
        self._latency_children: dict[tuple[str, str, str], Histogram] = {}
        self._fetch_children: dict[str, Histogram] = {}
        self._entity_children: dict[tuple[str, str], Counter] = {}

    def observe_request(self, model: str, version: str, status: str, seconds: float, entities: int) -> None:
        key = (model, version, status)
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children[key] = self.request_latency.labels(model, version, status)
        child.observe(seconds)
        if entities:
            counter = self._entity_children.get((model, version))
            if counter is None:
                counter = self._entity_children[(model, version)] = self.entities.labels(model, version)
            counter.inc(entities)

    def observe_fetch(self, feature_set: str, seconds: float) -> None:
        child = self._fetch_children.get(feature_set)
        if child is None:
            child = self._fetch_children[feature_set] = self.feature_fetch.labels(feature_set)
        child.observe(seconds)

    def serve_http(self, host: str, port: int) -> int:
        """Start ``/metrics`` on a daemon thread; returns the bound port (``port=0`` picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


def _channelz(call: str, *args: int) -> dict[str, Any] | None:
    """gRPC's own channelz statistics (its cygrpc functions: what the channelz service reads),
    None where this gRPC build does not have them."""
    try:
        from grpc._cython import cygrpc

        return dict(json.loads(getattr(cygrpc, call)(*args)))
    except Exception as exc:  # a private API: its absence costs a metric, never the service
        log.debug("channelz %s unavailable: %s", call, exc)
        return None


def grpc_server_ids() -> set[int]:
    """The channelz ids of the gRPC servers of this process."""
    data = _channelz("channelz_get_servers", 0)
    servers = data.get("server", []) if data else []
    return {int(s["ref"]["serverId"]) for s in servers}


class RefusedByGrpc(Collector):
    """``headwater_serving_refused_by_grpc_total``: calls that ended before the service took them.

    gRPC's core refuses a call at once when ``serving.max_queued_calls`` wait already; the
    service never sees it, but channelz counts calls started, succeeded and failed on the
    server, and a call refused there is neither. So: started - succeeded - failed - calls
    still open (those in the service; ones waiting in the queue at the time of the scrape are
    counted too, at most ``max_queued_calls``, which is why the total only ever grows).
    A call whose client gave up while it waited is counted here too: it was not served either.
    """

    def __init__(self) -> None:
        self.server_id: int | None = None  # set by the server once it runs
        self.in_flight: Callable[[], int] = lambda: 0  # calls in the service's handlers
        self._total = 0

    def collect(self) -> Iterator[Metric]:
        if self.server_id is None:
            return
        data = _channelz("channelz_get_server", self.server_id)
        server = data.get("server") if data else None
        if not isinstance(server, dict):
            return
        calls = server.get("data", {})
        started, succeeded, failed = (
            int(calls.get(k, 0)) for k in ("callsStarted", "callsSucceeded", "callsFailed")
        )
        self._total = max(self._total, started - succeeded - failed - self.in_flight())
        yield CounterMetricFamily(
            "headwater_serving_refused_by_grpc",
            "Calls that ended before the service took them: refused by gRPC because serving.max_queued_calls "
            "were waiting already, or given up by their client while waiting",
            value=self._total,
        )
