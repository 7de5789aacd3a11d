"""Build the platform's processors from the settings and run them, each in its own thread.

Names: ``features-<feature set>`` for every feature set of the repository,
``online-store-writer`` and ``lake-sink`` (every topic to Parquet). One process runs them
all on the embedded default; in production each can run as its own process
(``headwater process NAME``), several per name in one consumer group.

Each runs isolated: one that fails to start or stops on a failure (a corrupted online store,
an unwritable lake) is logged once at ERROR and the others go on; ``run_processors`` raises
naming it when the others are done (so ``headwater process`` exits non-zero), and its state is
in ``<data_dir>/run/processors/<name>.json``, which every processor rewrites as it runs
(state, error, events processed, dead letters sent and lost).

With ``until_caught_up``, processors finish in dependency order: one reading a topic that
another writes (the online-store writer reads ``feature-updates``, the lake sink every topic,
dead letters included) finishes only once those writers have finished and it has read all
they wrote.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from features.engine import EntityState
from features.repository import FeatureRepository
from headwater.errors import ConfigError, HeadwaterError, NotFoundError
from headwater.files import atomic_write
from headwater.settings import Settings
from processors.features import WATERMARKS_KEY, FeatureProcessor
from processors.lake import LakeWriter
from processors.lake_sink import LakeSink
from processors.online_writer import OnlineStoreWriter
from processors.runtime import InputsDone, Processor, StreamRunner
from processors.state_store import Position, StateStore, StoredStates
from serving.online_store import open_online_store
from streams.catalog import SchemaCatalog
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog

__all__ = ["ProcessorStatus", "build_hosts", "load_repository", "run_processors", "upstream_of"]

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

    processor: Processor
    producer: EventProducer
    processed: int

    @property
    def dead_lettered(self) -> int: ...

    @property
    def dead_letters_lost(self) -> int: ...

    def run(
        self, stop: threading.Event, *, until_caught_up: bool = False, inputs_done: InputsDone | None = None
    ) -> None: ...

    def close(self) -> None: ...


class HostFactory(Protocol):
    def __call__(
        self, settings: Settings, serde: Serde, processor: Processor, *, state: StateStore | None = ...,
        batch_size: int = ...,
    ) -> Host: ...  # fmt: skip


def _factories(
    settings: Settings, serde: Serde, repository: FeatureRepository, host: HostFactory
) -> dict[str, Callable[[], Host]]:
    """A function building each processor's host, by name (nothing is opened until called)."""

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
    return factories


def _chosen(factories: Mapping[str, object], names: Sequence[str] | None) -> list[str]:
    unknown = [n for n in names or [] if n not in factories]
    if unknown:
        raise NotFoundError(f"unknown processor(s) {', '.join(unknown)}; known: {', '.join(factories)}")
    return list(names or factories)


def build_hosts(
    settings: Settings,
    serde: Serde,
    repository: FeatureRepository,
    names: Sequence[str] | None = None,
    host: HostFactory = StreamRunner,
) -> dict[str, Host]:
    """The named processors (all by default), each built into a ``host`` of the chosen engine."""
    factories = _factories(settings, serde, repository, host)
    return {name: factories[name]() for name in _chosen(factories, names)}


def upstream_of(processors: Mapping[str, Processor]) -> dict[str, set[str]]:
    """For each processor, the others that write to one of its inputs (every processor may write
    dead letters). A cycle would have processors wait for each other: ConfigError."""
    writes = {name: {*p.outputs, "dead-letters"} for name, p in processors.items()}
    upstream = {
        name: {other for other in processors if other != name and writes[other] & set(p.inputs)}
        for name, p in processors.items()
    }
    for name in processors:  # a processor reachable from itself through its upstream: a cycle
        seen, todo = set(), list(upstream[name])
        while todo:
            other = todo.pop()
            if other == name:
                raise ConfigError(f"processors {name} and {sorted(upstream[name])} read each other's outputs")
            if other not in seen:
                seen.add(other)
                todo += upstream[other]
    return upstream


@dataclass
class ProcessorStatus:
    """What ``<data_dir>/run/processors/<name>.json`` says of one processor."""

    name: str
    engine: str
    state: str = "starting"  # running, caught up, stopped, failed
    error: str | None = None
    processed: int = 0
    dead_lettered: int = 0
    dead_letters_lost: int = 0  # records that could not be dead-lettered and were skipped
    pid: int = field(default_factory=os.getpid)
    updated_ms: int = 0

    def refresh(self, host: Host | None) -> None:
        if host is not None:
            self.processed = host.processed
            self.dead_lettered = host.dead_lettered
            self.dead_letters_lost = host.dead_letters_lost
        self.updated_ms = int(time.time() * 1000)

    def save(self, folder: Path) -> None:
        try:
            atomic_write(folder / f"{self.name}.json", json.dumps(asdict(self), indent=1).encode())
        except OSError as exc:  # a status that cannot be written must not stop a processor
            log.warning("cannot write the status of %s in %s: %s", self.name, folder, exc)


STATUS_INTERVAL_S = 5.0


def run_processors(  # noqa: PLR0915 - the lifecycle of the threads, in order
    settings: Settings,
    names: Sequence[str] | None,
    stop: threading.Event,
    *,
    until_caught_up: bool = False,
    on_ready: Callable[[list[str]], None] | None = None,
) -> dict[str, int]:
    """Run the named processors (all by default) until ``stop``; returns events processed per name.

    Raises :class:`HeadwaterError` naming every processor that failed, once the others are done."""
    host: HostFactory = StreamRunner
    engine = settings.processors.engine
    if engine == "faust":  # the same processors hosted by Faust agents
        from processors.faust import FaustHost  # imported only when chosen: Faust and aiokafka are heavy

        host = FaustHost
    serde = Serde(SchemaCatalog.load(settings.schemas_dir))
    factories = _factories(settings, serde, load_repository(settings), host)
    chosen = _chosen(factories, names)
    folder = settings.state_dir / "processors"
    status = {name: ProcessorStatus(name, engine) for name in chosen}
    failures: dict[str, BaseException] = {}
    hosts: dict[str, Host] = {}
    for name in chosen:
        try:
            hosts[name] = factories[name]()
        except Exception as exc:  # e.g. an online store that cannot be opened: the others still run
            _failed(name, exc, status[name], failures, folder)

    upstream = upstream_of({name: h.processor for name, h in hosts.items()})
    finished = {name: threading.Event() for name in hosts}

    def inputs_done(name: str) -> InputsDone:
        physical = {TopicCatalog(settings).name(t) for t in hosts[name].processor.inputs}

        def done() -> dict[Position, int] | None:
            if not all(finished[u].is_set() for u in upstream[name]):
                return None
            written: dict[Position, int] = {}
            for u in upstream[name]:
                for (topic, partition), offset in dict(hosts[u].producer.produced).items():
                    if topic in physical and partition is not None:
                        written[(topic, partition)] = max(written.get((topic, partition), 0), offset)
            return written

        return done

    def run(name: str, runner: Host) -> None:
        state = status[name]
        state.state = "running"
        state.refresh(runner)
        state.save(folder)
        try:
            runner.run(stop, until_caught_up=until_caught_up, inputs_done=inputs_done(name))
        except Exception as exc:  # this processor stops; the others go on
            _failed(name, exc, state, failures, folder, runner)
        else:
            state.state = "stopped" if stop.is_set() or not until_caught_up else "caught up"
        finally:
            finished[name].set()

    threads = [threading.Thread(target=run, args=item, name=item[0], daemon=True) for item in hosts.items()]
    for thread in threads:
        thread.start()
    log.info("processors running on the %s engine: %s", engine, ", ".join(hosts))
    if on_ready is not None:
        on_ready(list(hosts))
    for thread in threads:
        while thread.is_alive():
            thread.join(STATUS_INTERVAL_S)
            for name, state in status.items():
                state.refresh(hosts.get(name))
                state.save(folder)
    for name, runner in hosts.items():
        try:
            runner.close()
        except Exception as exc:  # one that failed may fail to close too: the others still close
            log.warning("processor %s did not close cleanly: %s", name, exc)
        status[name].refresh(runner)
        status[name].save(folder)
    if failures:
        ran = ", ".join(f"{n} {h.processed} events" for n, h in hosts.items() if n not in failures)
        failed = "; ".join(f"{n}: {exc}" for n, exc in failures.items())
        raise HeadwaterError(
            f"processor(s) failed: {failed} (fix the cause and run them again: they resume from their "
            f"last commit){f'; the others ran: {ran}' if ran else ''}"
        )
    return {name: runner.processed for name, runner in hosts.items()}


def _failed(  # noqa: PLR0917 - the failure and where it is recorded
    name: str,
    error: BaseException,
    state: ProcessorStatus,
    failures: dict[str, BaseException],
    folder: Path,
    host: Host | None = None,
) -> None:
    """Record a processor's failure: one ERROR line (with its traceback), its status file."""
    log.error("processor %s stopped: %s; the others go on", name, error, exc_info=error)
    failures[name] = error
    state.state, state.error = "failed", f"{type(error).__name__}: {error}"[:2000]
    state.refresh(host)
    state.save(folder)
