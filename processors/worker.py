"""Build the platform's processors from the settings and run them, each in its own thread.

Names: ``features-<feature set>`` for every feature set of the repository,
``online-store-writer`` and ``lake-sink`` (every topic to Parquet). One process runs them
all on the embedded default; in production each can run as its own process
(``headwater process NAME``), several per name in one consumer group.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from features.engine import EntityState
from features.repository import FeatureRepository
from headwater.errors import ConfigError, HeadwaterError, NotFoundError
from headwater.settings import Settings
from processors.features import WATERMARKS_KEY, FeatureProcessor
from processors.lake import LakeWriter
from processors.lake_sink import LakeSink
from processors.online_writer import OnlineStoreWriter
from processors.runtime import Processor, StreamRunner
from processors.state_store import StateStore, StoredStates
from serving.online_store import open_online_store
from streams.catalog import SchemaCatalog
from streams.serde import Serde

__all__ = ["load_repository", "run_processors"]

log = logging.getLogger(__name__)


def load_repository(settings: Settings) -> FeatureRepository:
    """The repository named by ``settings.feature_repository`` (``module:attribute``: instance or factory)."""
    module_name, _, attr = settings.feature_repository.partition(":")
    try:
        repository = getattr(importlib.import_module(module_name), attr or "repository")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"feature_repository {settings.feature_repository!r} cannot be loaded: {exc}"
        ) from exc
    if callable(repository) and not isinstance(repository, FeatureRepository):
        repository = repository()  # a factory function building the repository
    if not isinstance(repository, FeatureRepository):
        raise ConfigError(f"feature_repository {settings.feature_repository!r} is not a FeatureRepository")
    return repository


class Host(Protocol):
    """What runs one processor: the native :class:`StreamRunner` or :class:`processors.faust.FaustHost`."""

    processed: int

    def run(self, stop: threading.Event, *, until_caught_up: bool = False) -> None: ...

    def close(self) -> None: ...


class HostFactory(Protocol):
    def __call__(
        self, settings: Settings, serde: Serde, processor: Processor, *, state: StateStore | None = ...,
        batch_size: int = ...,
    ) -> Host: ...  # fmt: skip


def build_hosts(
    settings: Settings,
    serde: Serde,
    repository: FeatureRepository,
    names: Sequence[str] | None = None,
    host: HostFactory = StreamRunner,
) -> dict[str, Host]:
    """The named processors (all by default), each built into a ``host`` of the chosen engine."""

    def features(name: str) -> Callable[[], Host]:
        def build() -> Host:
            store = StateStore(settings.data_dir / "state" / f"features-{name}")
            processor = FeatureProcessor(
                repository.feature_set(name),
                StoredStates(store, EntityState),
                max_future_ms=round(settings.processors.future_skew_s * 1000),
                idle_partition_ms=round(settings.processors.idle_partition_s * 1000),
                watermarks=store.get(WATERMARKS_KEY),
            )
            return host(settings, serde, processor, state=store)

        return build

    def writer() -> Host:
        ttls = {fs.name: fs.ttl_ms // 1000 for fs in repository.feature_sets}
        return host(settings, serde, OnlineStoreWriter(open_online_store(settings), ttls))

    factories: dict[str, Callable[[], Host]] = {
        f"features-{fs.name}": features(fs.name) for fs in repository.feature_sets
    }
    factories["online-store-writer"] = writer
    factories["lake-sink"] = lambda: host(
        settings, serde, LakeSink(LakeWriter(settings, serde.catalog)), batch_size=20_000
    )
    unknown = [n for n in names or [] if n not in factories]
    if unknown:
        raise NotFoundError(f"unknown processor(s) {', '.join(unknown)}; known: {', '.join(factories)}")
    return {name: factories[name]() for name in names or factories}


def run_processors(
    settings: Settings,
    names: Sequence[str] | None,
    stop: threading.Event,
    *,
    until_caught_up: bool = False,
    on_ready: Callable[[list[str]], None] | None = None,
) -> dict[str, int]:
    """Run the named processors (all by default) until ``stop``; returns events processed per name."""
    host: HostFactory = StreamRunner
    if settings.processors.engine == "faust":  # the same processors hosted by Faust agents
        from processors.faust import FaustHost  # imported only when chosen: Faust and aiokafka are heavy

        host = FaustHost
    serde = Serde(SchemaCatalog.load(settings.schemas_dir))
    hosts = build_hosts(settings, serde, load_repository(settings), names, host)
    errors: dict[str, BaseException] = {}

    def run(name: str, runner: Host) -> None:
        try:
            runner.run(stop, until_caught_up=until_caught_up)
        except BaseException as exc:  # one failing processor stops the worker, loudly
            log.exception("processor %s failed", name)
            errors[name] = exc
            stop.set()

    threads = [threading.Thread(target=run, args=item, name=item[0], daemon=True) for item in hosts.items()]
    for thread in threads:
        thread.start()
    log.info("processors running on the %s engine: %s", settings.processors.engine, ", ".join(hosts))
    if on_ready is not None:
        on_ready(list(hosts))
    for thread in threads:
        thread.join()
    for runner in hosts.values():
        runner.close()
    if errors:
        name, exc = next(iter(errors.items()))
        raise HeadwaterError(f"processor {name} failed: {exc}") from exc
    return {name: runner.processed for name, runner in hosts.items()}
