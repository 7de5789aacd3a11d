"""Prometheus metrics of the prediction service, served on ``/metrics``.

Each server owns a :class:`ServingMetrics` with its own registry (several servers in one
test process never collide). Labelled children are looked up once per label set and cached:
``Histogram.labels(...)`` costs microseconds, which the request path does not have.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["ServingMetrics"]

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
