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

from features.engine import EntityState
from features.repository import FeatureRepository
from headwater.errors import ConfigError, HeadwaterError, NotFoundError
from headwater.settings import Settings
from processors.features import FeatureProcessor
from processors.lake import LakeWriter
from processors.lake_sink import LakeSink
from processors.online_writer import OnlineStoreWriter
from processors.runtime import StreamRunner
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


def _runner_factories(
    settings: Settings, serde: Serde, repository: FeatureRepository
) -> dict[str, Callable[[], StreamRunner]]:
    def feature_runner(name: str) -> Callable[[], StreamRunner]:
        def build() -> StreamRunner:
            store = StateStore(settings.data_dir / "state" / f"features-{name}")
            processor = FeatureProcessor(repository.feature_set(name), StoredStates(store, EntityState))
            return StreamRunner(settings, serde, processor, state=store)

        return build

    def writer() -> StreamRunner:
        ttls = {fs.name: fs.ttl_ms // 1000 for fs in repository.feature_sets}
        return StreamRunner(settings, serde, OnlineStoreWriter(open_online_store(settings), ttls))

    factories: dict[str, Callable[[], StreamRunner]] = {
        f"features-{fs.name}": feature_runner(fs.name) for fs in repository.feature_sets
    }
    factories["online-store-writer"] = writer
    factories["lake-sink"] = lambda: StreamRunner(
        settings, serde, LakeSink(LakeWriter(settings, serde.catalog)), batch_size=20_000
    )
    return factories


def run_processors(
    settings: Settings,
    names: Sequence[str] | None,
    stop: threading.Event,
    *,
    until_caught_up: bool = False,
    on_ready: Callable[[list[str]], None] | None = None,
) -> dict[str, int]:
    """Run the named processors (all by default) until ``stop``; returns events processed per name."""
    if settings.processors.engine == "faust":  # the same processors hosted by Faust agents
        from processors.faust import run_faust  # imported only when chosen: Faust and aiokafka are heavy

        return run_faust(settings, names, stop, until_caught_up=until_caught_up, on_ready=on_ready)
    serde = Serde(SchemaCatalog.load(settings.schemas_dir))
    repository = load_repository(settings)
    factories = _runner_factories(settings, serde, repository)
    unknown = [n for n in names or [] if n not in factories]
    if unknown:
        raise NotFoundError(f"unknown processor(s) {', '.join(unknown)}; known: {', '.join(factories)}")
    runners = {name: factories[name]() for name in names or factories}
    errors: dict[str, BaseException] = {}

    def run(name: str, runner: StreamRunner) -> None:
        try:
            runner.run(stop, until_caught_up=until_caught_up)
        except BaseException as exc:  # one failing processor stops the worker, loudly
            log.exception("processor %s failed", name)
            errors[name] = exc
            stop.set()

    threads = [threading.Thread(target=run, args=item, name=item[0], daemon=True) for item in runners.items()]
    for thread in threads:
        thread.start()
    log.info("processors running: %s", ", ".join(runners))
    if on_ready is not None:
        on_ready(list(runners))
    for thread in threads:
        thread.join()
    for runner in runners.values():
        runner.close()
    if errors:
        name, exc = next(iter(errors.items()))
        raise HeadwaterError(f"processor {name} failed: {exc}") from exc
    return {name: runner.processed for name, runner in runners.items()}
