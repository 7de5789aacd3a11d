"""Session-scoped real components shared by the integration tests.

Each fixture starts the real thing on a free port in a temporary data directory, fails
loudly (never skips) when it will not start, and stops it by its own process id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from headwater.settings import Settings, load_settings
from streams.broker import EmbeddedBroker
from streams.catalog import SchemaCatalog
from streams.serde import Serde
from streams.topics import TopicCatalog

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "avro"


@pytest.fixture(scope="session")
def catalog() -> SchemaCatalog:
    return SchemaCatalog.load(SCHEMAS)


@pytest.fixture(scope="session")
def serde(catalog: SchemaCatalog) -> Serde:
    return Serde(catalog)


@pytest.fixture(scope="session")
def broker_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A real embedded Tansu broker for the whole session; settings point at it."""
    data_dir = tmp_path_factory.mktemp("headwater-broker")
    settings = load_settings(data_dir=data_dir)
    broker = EmbeddedBroker(settings)
    info = broker.start()  # raises with the broker's log if it will not start
    # Services started by tests pick free ports (never the defaults a developer's stack may use).
    yield load_settings(
        data_dir=data_dir, bootstrap_servers=info.bootstrap, serving={"port": 0, "metrics_port": 0}
    )
    broker.stop()


@pytest.fixture()
def settings(broker_settings: Settings, tmp_path: Path) -> Settings:
    """Per-test settings on the session broker: a fresh topic prefix and data directory, topics created."""
    s = broker_settings.model_copy(
        update={"topic_prefix": f"t{uuid.uuid4().hex[:8]}.", "data_dir": tmp_path / "data"}
    )
    create_topics(s)
    return s


def create_topics(settings: Settings) -> None:
    TopicCatalog(settings).create_all(AdminClient({"bootstrap.servers": settings.bootstrap_servers}))
