"""The model runtime: which versions serve which references, kept current from the registry.

:class:`ModelRuntime` follows the compacted ``models`` topic (``CompactedState`` feeding a
``RegistryState``). After every change it works out the versions that must be in memory
(what each alias points at, and the shadows attached to each alias), loads the missing
ones on its loader thread (artifact read and sha256-verified by the artifact store, then
``models.artifact.load_pipeline``) and publishes a new :class:`Routes`: an immutable
snapshot swapped by one reference assignment. A request reads ``runtime.routes`` once and
keeps the :class:`LoadedModel` it found to the end, so an alias moving mid-request changes
nothing for it: no lock, no failed in-flight call.

A version that fails to load (tampered artifact, incompatible code) is not published: the
alias keeps serving the version it served before, an ``alert`` event is sent and
``model_load_failures`` counted. A service that starts with nothing served before (a restart)
falls back to the newest loadable of the alias's earlier versions
(:meth:`registry.state.RegistryState.earlier_versions`: what a rollback would return to) and
raises a CRITICAL ``model_fallback`` alert, rather than serving nothing. Versions asked for by
number (``name:7``) that no alias points at are loaded on first use
(:meth:`ModelRuntime.load_version`).

When ``headwater up`` starts the embedded broker again (it restores ``models`` from the lake),
the runtime reads the registry from the new broker (:class:`serving.broker_watch.BrokerWatch`):
events it applied before are recognised by their id, so only what is new changes anything.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from features.repository import FeatureRepository
from headwater.errors import HeadwaterError
from headwater.settings import Settings
from models.artifact import load_pipeline
from models.fastpath import Scorer, compile_scorer
from models.pipeline import ModelPipeline
from registry.artifacts import ArtifactStore
from registry.state import ModelVersion, RegistryState
from serving.assemble import ColumnarAssembler
from serving.broker_watch import BrokerWatch
from serving.events import PredictionEncoder, prediction_header
from streams.consumer import Event
from streams.kafka import client_config
from streams.serde import Serde
from streams.state import CompactedState
from streams.topics import TopicCatalog

__all__ = ["FeatureRead", "LoadedModel", "ModelRuntime", "Routes", "build_loaded", "new_alert"]

log = logging.getLogger(__name__)

MAX_PINNED_VERSIONS = 16  # versions loaded by number and kept, beyond those aliases point at


@dataclass(frozen=True, slots=True)
class FeatureRead:
    """One online-store batch read of a request: a feature set, the entity key naming its rows."""

    feature_set: str
    entity_key: str
    names: tuple[str, ...]
    refs: tuple[str, ...]  # "feature_set:name", the keys of the assembled row


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One loaded version and everything the request path needs, computed once at load."""

    name: str
    version: int
    sha256: str
    pipeline: ModelPipeline
    reads: tuple[FeatureRead, ...]
    entity_keys: tuple[str, ...]
    request_fields: tuple[str, ...]  # request features and on-demand transforms' request inputs
    encoder: PredictionEncoder
    columnar: ColumnarAssembler | None  # column-wise assemble, where it equals pipeline.assemble
    scorer: Scorer  # models.fastpath's scorer of the estimator: equal to pipeline.scores
    bare_encoder: PredictionEncoder  # no features: predictions read precomputed, not computed
    precomputed_set: str | None  # "predictions__<model>" when the spec serves batch predictions

    @property
    def version_label(self) -> str:
        return str(self.version)


@dataclass(frozen=True)
class Routes:
    """An immutable snapshot: what serves each alias and version, and what the registry knows."""

    aliases: Mapping[tuple[str, str], LoadedModel] = field(default_factory=dict)
    versions: Mapping[tuple[str, int], LoadedModel] = field(default_factory=dict)
    shadows: Mapping[tuple[str, str], tuple[LoadedModel, ...]] = field(default_factory=dict)
    known: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # model -> alias -> version
    registered: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # model -> versions


def build_loaded(
    mv: ModelVersion,
    pipeline: ModelPipeline,
    repository: FeatureRepository,
    serde: Serde,
    *,
    native_dir: Path | None = None,
) -> LoadedModel:
    """The request-path plan of a loaded pipeline; warms it up with one scoring call.

    ``native_dir``: where gradient-boosted trees are compiled to machine code and cached
    (:func:`models.fastpath.compile_scorer`); the service passes ``<data_dir>/cache/models``.
    """
    spec = pipeline.spec
    reads: list[FeatureRead] = []
    for fs_name, names in pipeline.reads.items():
        entity = repository.feature_set(fs_name).entity
        reads.append(FeatureRead(fs_name, entity, tuple(names), tuple(f"{fs_name}:{n}" for n in names)))
    request_fields = list(spec.request_features)
    for ref in repository.resolve_many(spec.features):
        if ref.transform is not None:
            request_fields += [f for f in ref.transform.request_inputs if f not in request_fields]
    header = prediction_header(serde.writer_schema("prediction").fingerprint)
    encoder = PredictionEncoder(header, pipeline.columns, [r.feature_set for r in reads])
    if pipeline.estimator is None:
        raise HeadwaterError(f"model {mv.name}:{mv.version} holds no fitted estimator")
    scorer = compile_scorer(pipeline.estimator, spec.task, native_dir=native_dir)
    for rows in (1, 64):  # the first calls pay any lazy set-up (compiling, loading), not a request
        scorer(np.zeros((rows, len(pipeline.columns))))
    return LoadedModel(
        name=mv.name,
        version=mv.version,
        sha256=mv.artifact_sha256,
        pipeline=pipeline,
        reads=tuple(reads),
        entity_keys=tuple(spec.entity_keys),
        request_fields=tuple(request_fields),
        encoder=encoder,
        columnar=ColumnarAssembler.build(pipeline, [(r.feature_set, r.names) for r in reads]),
        scorer=scorer,
        bare_encoder=PredictionEncoder(header, [], []),
        precomputed_set=f"predictions__{spec.name}" if spec.serve_precomputed else None,
    )


class ModelRuntime:
    """Follows the registry and publishes :class:`Routes`; loads on one loader thread."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        repository: FeatureRepository,
        artifacts: ArtifactStore,
        *,
        on_loaded: Callable[[LoadedModel], None] | None = None,
        on_failed: Callable[[ModelVersion, BaseException], None] | None = None,
        on_published: Callable[[Routes], None] | None = None,
        on_fallback: Callable[[str, str, int, LoadedModel], None] | None = None,
    ) -> None:
        self.settings = settings
        self.serde = serde
        self.repository = repository
        self.artifacts = artifacts
        self.routes = Routes()
        self._on_loaded = on_loaded
        self._on_failed = on_failed
        self._on_published = on_published
        self._on_fallback = on_fallback
        self._fell_back: set[tuple[str, str, int, int]] = set()  # alerted once each
        self._state = RegistryState()  # touched by the reader thread's callback, under _lock
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, int, str], LoadedModel] = {}  # loader thread only
        self._failed: dict[tuple[str, int, str], str] = {}  # (name, version, sha) -> error
        self._pinned: list[tuple[str, int]] = []
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._reader: CompactedState | None = None
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.generation = 0  # routes published so far (tests wait on it)

    def start(self, timeout_s: float = 60.0) -> ModelRuntime:
        """Read the registry to its end and load what it points at before returning."""
        watch = BrokerWatch(self.settings)
        self._reader = self._read_registry()
        self._reader.wait_until_caught_up(timeout_s)
        self._loader.submit(self._reconcile).result(timeout_s)
        if watch.watching:
            self._watcher = threading.Thread(
                target=self._follow_broker, args=(watch,), name="registry-broker", daemon=True
            )
            self._watcher.start()
        return self

    def _read_registry(self) -> CompactedState:
        return CompactedState(self.settings, self.serde, "models", on_change=self._on_change).start()

    def _follow_broker(self, watch: BrokerWatch) -> None:
        """Read the registry from each new embedded broker, once its ``models`` topic exists."""
        moved = False
        while not self._stopping.wait(watch.interval_s):
            moved = watch.changed() or moved
            if moved and self._registry_topic_exists():
                old, self._reader = self._reader, self._read_registry()
                if old is not None:
                    old.stop()
                moved = False
                log.info(
                    "registry: reading models from the new broker at %s",
                    watch.current and watch.current.bootstrap,
                )

    def _registry_topic_exists(self) -> bool:
        name = TopicCatalog(self.settings).name("models")
        try:
            metadata = AdminClient(client_config(self.settings)).list_topics(name, timeout=2.0)
        except (KafkaException, HeadwaterError):
            return False
        topic = metadata.topics.get(name)
        return topic is not None and topic.error is None

    def _on_change(self, _key: str, record: dict[str, Any] | None, _event: Event) -> None:
        if record is None:
            return
        with self._lock:
            self._state.apply(record)
        # Coalesce bursts: one reconcile queued at a time covers every change before it runs.
        if not self._dirty.is_set():
            self._dirty.set()
            self._loader.submit(self._reconcile)

    def _reconcile(self) -> None:
        self._dirty.clear()
        with self._lock:
            state = self._state
            known = {name: state.aliases(name) for name in state.models()}
            registered = {name: _version_numbers(state, name) for name in state.models()}
            wanted: dict[tuple[str, int], ModelVersion] = {}
            shadow_wants: dict[tuple[str, str], list[int]] = {}
            for name, pointers in known.items():
                for alias, version in pointers.items():
                    wanted[(name, version)] = state.version(name, version)
                    shadows = state.shadows(name, alias)
                    shadow_wants[(name, alias)] = shadows
                    for v in shadows:
                        wanted[(name, v)] = state.version(name, v)
            for name, version in self._pinned:
                mv = self._find(state, name, version)
                if mv is not None and not mv.archived:
                    wanted[(name, version)] = mv
            earlier = {
                (name, alias): [
                    mv for v in state.earlier_versions(name, alias) if (mv := self._find(state, name, v))
                ]
                for name, pointers in known.items()
                for alias in pointers
            }
        loaded = {key: self._load(mv) for key, mv in wanted.items()}
        previous = self.routes
        aliases: dict[tuple[str, str], LoadedModel] = {}
        for name, pointers in known.items():
            for alias, version in pointers.items():
                model = loaded.get((name, version))
                if model is None and (name, alias) in previous.aliases:
                    model = previous.aliases[(name, alias)]  # the new version failed: keep the old one
                elif model is None:
                    model = self._fall_back(name, alias, version, earlier[(name, alias)], loaded)
                if model is not None:
                    aliases[(name, alias)] = model
        versions = {(m.name, m.version): m for m in loaded.values() if m is not None}
        attached = {
            key: tuple(m for v in vs if (m := loaded.get((key[0], v))) is not None)
            for key, vs in shadow_wants.items()
        }
        self.routes = Routes(aliases, versions, {k: v for k, v in attached.items() if v}, known, registered)
        self.generation += 1
        if self._on_published is not None:
            self._on_published(self.routes)
        # Forget what nothing points at any more (the routes above hold what still serves).
        live = {(m.name, m.version, m.sha256) for m in versions.values()}
        self._loaded = {k: v for k, v in self._loaded.items() if k in live}

    def _fall_back(
        self,
        name: str,
        alias: str,
        failed: int,
        earlier: list[ModelVersion],
        loaded: dict[tuple[str, int], LoadedModel | None],
    ) -> LoadedModel | None:
        """The newest of the alias's earlier versions that loads (sha256 checked like any other),
        for an alias whose version failed with nothing served before; None if none loads."""
        for mv in earlier:
            model = loaded.get((name, mv.version)) or self._load(mv)
            if model is None:
                continue
            loaded[(name, mv.version)] = model
            key = (name, alias, failed, mv.version)
            if key not in self._fell_back:
                self._fell_back.add(key)
                log.critical(
                    "model_fallback ref=%s@%s failed_version=%d serving_version=%d",
                    name,
                    alias,
                    failed,
                    mv.version,
                )
                if self._on_fallback is not None:
                    self._on_fallback(name, alias, failed, model)
            return model
        return None

    @staticmethod
    def _find(state: RegistryState, name: str, version: int) -> ModelVersion | None:
        try:
            return state.version(name, version)
        except HeadwaterError:
            return None

    def _load(self, mv: ModelVersion) -> LoadedModel | None:
        key = (mv.name, mv.version, mv.artifact_sha256)
        if key in self._loaded:
            return self._loaded[key]
        if key in self._failed:
            return None  # failed before: an alert was raised then; a new event retries nothing
        started = time.perf_counter()
        try:
            data = self.artifacts.get(mv.artifact_uri, mv.artifact_sha256)  # verifies the sha256
            pipeline = load_pipeline(data, self.repository)
            if pipeline.spec.name != mv.name:
                raise HeadwaterError(
                    f"the artifact holds model {pipeline.spec.name!r}, registered as {mv.name!r}"
                )
            model = build_loaded(
                mv,
                pipeline,
                self.repository,
                self.serde,
                native_dir=self.settings.data_dir / "cache" / "models",
            )
        except Exception as exc:  # any failure keeps the previous version serving
            self._failed[key] = str(exc)
            log.error(
                "model_load_failed model=%s version=%d sha256=%s error=%s",
                mv.name,
                mv.version,
                mv.artifact_sha256[:12],
                exc,
            )
            if self._on_failed is not None:
                self._on_failed(mv, exc)
            return None
        self._loaded[key] = model
        log.info(
            "model_loaded model=%s version=%d sha256=%s seconds=%.3f",
            mv.name,
            mv.version,
            mv.artifact_sha256[:12],
            time.perf_counter() - started,
        )
        if self._on_loaded is not None:
            self._on_loaded(model)
        return model

    def load_version(self, name: str, version: int) -> Future[None]:
        """Pin ``name:version`` (loaded on the loader thread); the future ends when routes include it."""
        with self._lock:
            if (name, version) not in self._pinned:
                self._pinned.append((name, version))
                del self._pinned[:-MAX_PINNED_VERSIONS]
        return self._loader.submit(self._reconcile)

    def failure(self, name: str, version: int) -> str | None:
        """Why ``name:version`` failed to load, if it did."""
        return next((err for (n, v, _), err in self._failed.items() if (n, v) == (name, version)), None)

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(5.0)
            self._watcher = None
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        self._loader.shutdown(wait=True, cancel_futures=True)


def _version_numbers(state: RegistryState, name: str) -> tuple[int, ...]:
    try:
        return tuple(v.version for v in state.versions(name))
    except HeadwaterError:  # only alias events survived so far
        return ()


def new_alert(kind: str, subject: str, message: str, labels: dict[str, str]) -> dict[str, Any]:
    """An ``alert`` event record raised by the serving component."""
    return {
        "event_id": uuid.uuid4().hex,
        "event_time": time.time_ns() // 1_000_000,
        "source": "serving",
        "severity": "CRITICAL",
        "kind": kind,
        "subject": subject,
        "message": message,
        "value": None,
        "threshold": None,
        "labels": labels,
    }
