"""The local stack: embedded broker, topics, restored state, and background services.

``start_stack`` is what ``headwater up`` (and the main job) does, in order: start the
embedded broker unless ``bootstrap_servers`` points at a cluster, create every topic, restore
the compacted topics from the lake into a broker it just started (:mod:`infra.restore`), then
start the stream processors and the prediction service (``headwater serve``) as background
services. ``stop_stack`` undoes it in reverse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient

from headwater.errors import HeadwaterError
from headwater.settings import Settings
from infra.restore import restore_from_lake
from infra.services import ServiceInfo, Services
from serving import READY_LINE as SERVING_READY
from streams.broker import EmbeddedBroker, resolve_bootstrap
from streams.catalog import SchemaCatalog
from streams.kafka import client_config
from streams.serde import Serde
from streams.topics import TopicCatalog

__all__ = [
    "PROCESSORS_READY",
    "Stack",
    "ensure_topics",
    "serving_target",
    "start_stack",
    "stop_services",
    "stop_stack",
]

log = logging.getLogger(__name__)

PROCESSORS_READY = "processors running:"  # printed by `headwater process` once its runners started


@dataclass(frozen=True)
class Stack:
    """What ``start_stack`` found or started."""

    bootstrap: str
    broker_pid: int | None  # None: an external Kafka cluster (bootstrap_servers is set)
    started: bool  # True if this call started the broker (so the caller may stop it)
    topics_created: int
    topics_existing: int
    services: list[ServiceInfo] = field(default_factory=list)
    restored: dict[str, int] = field(default_factory=dict)  # compacted topic -> records restored
    services_started: list[str] = field(default_factory=list)  # by this call (the caller may stop them)


def ensure_topics(settings: Settings) -> tuple[list[str], list[str]]:
    """Create every missing Headwater topic; returns ``(created, already there)`` physical names."""
    catalog = TopicCatalog(settings)
    created = catalog.create_all(AdminClient(client_config(settings)))
    existing = [catalog.name(s.logical) for s in catalog.specs() if catalog.name(s.logical) not in created]
    return created, existing


def start_stack(settings: Settings, *, processors: bool = True, serving: bool = True) -> Stack:
    """Start what is not running yet; idempotent."""
    pid: int | None = None
    started = False
    if not settings.bootstrap_servers:
        broker = EmbeddedBroker(settings)
        running = broker.info()
        info = running or broker.start()
        pid, started = info.pid, running is None
    bootstrap = resolve_bootstrap(settings)
    created, existing = ensure_topics(settings)
    restored = restore_from_lake(settings, Serde(SchemaCatalog.load(settings.schemas_dir))) if started else {}
    services, services_started = [], []
    if processors:
        if Services(settings).info("processors") is None:
            services_started.append("processors")
        services.append(
            Services(settings).start("processors", ["process"], ready=PROCESSORS_READY, timeout_s=60)
        )
    if serving:  # after the processors: it reads the online store they keep current
        if Services(settings).info("serving") is None:
            services_started.append("serving")
        services.append(Services(settings).start("serving", ["serve"], ready=SERVING_READY, timeout_s=120))
    return Stack(bootstrap, pid, started, len(created), len(existing), services, restored, services_started)


def stop_services(settings: Settings, names: list[str] | None = None) -> list[str]:
    """Stop the named background services (all by default); returns those stopped."""
    services = Services(settings)
    return [n for n in (names if names is not None else [i.name for i in services.all()]) if services.stop(n)]


def stop_stack(settings: Settings) -> tuple[list[str], int | None]:
    """Stop the services, then the embedded broker; returns (services stopped, broker pid or None)."""
    stopped = stop_services(settings)
    broker = EmbeddedBroker(settings)
    info = broker.info()
    pid = info.pid if info is not None and broker.stop() else None
    return stopped, pid


def serving_target(settings: Settings) -> str:
    """``host:port`` of this stack's running prediction service (its port may have been picked free)."""
    info = Services(settings).info("serving")
    if info is None:
        raise HeadwaterError("the prediction service is not running: start it with `headwater up`")
    with open(info.log_file, "rb") as f:
        lines = [line for line in f.read().decode(errors="replace").splitlines() if SERVING_READY in line]
    if not lines:
        raise HeadwaterError(f"the prediction service has not said it is ready yet (log {info.log_file})")
    address = lines[-1].split(SERVING_READY, 1)[1].split()[0]
    return address.removeprefix("grpc://").removeprefix("grpcs://")
