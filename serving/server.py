"""The prediction server: gRPC aio with health checking, reflection, TLS and tokens as options,
and Prometheus ``/metrics``.

    server = PredictionServer(settings)
    info = await server.start()      # follows the registry, loads the models, binds the ports
    await server.wait()              # until stop()

:func:`serve` runs one in the foreground (``headwater serve``); :class:`ServerThread` runs one
on a thread of its own (tests, notebooks). Everything comes from ``settings.serving``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headwater.errors import ConfigError, HeadwaterError
from headwater.settings import Settings
from processors.worker import load_repository
from registry.artifacts import open_artifact_store
from registry.state import ModelVersion
from serving import READY_LINE
from serving.api.v1 import SERVICE_NAME, prediction_pb2
from serving.event_log import EventLog
from serving.limits import limit_threads
from serving.metrics import ServingMetrics, grpc_server_ids
from serving.online_store import OnlineStore, open_online_store
from serving.runtime import LoadedModel, ModelRuntime, Routes, new_alert
from serving.service import PredictionService
from serving.shadow import ShadowScorer
from streams.catalog import SchemaCatalog
from streams.serde import Serde

__all__ = ["READY_LINE", "PredictionServer", "ServerInfo", "ServerThread", "read_tokens", "serve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerInfo:
    host: str
    port: int
    metrics_port: int
    tls: bool
    models: tuple[str, ...]  # "name@alias -> version" served at start

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


def read_tokens(path: Path | None) -> list[str]:
    """Bearer tokens, one per line (blank lines and ``#`` comments ignored)."""
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"serving.auth_tokens_file {path}: {exc}") from exc
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ConfigError(f"serving.auth_tokens_file {path} has no token: one token per line")
    return tokens


class PredictionServer:
    """All parts of one serving process, started and stopped together."""

    def __init__(self, settings: Settings, *, event_producer_config: dict[str, object] | None = None) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.serde = Serde(SchemaCatalog.load(settings.schemas_dir))
        self._producer_config = dict(event_producer_config or {})
        self.store: OnlineStore | None = None
        self.events: EventLog | None = None
        self.runtime: ModelRuntime | None = None
        self.shadow: ShadowScorer | None = None
        self.service: PredictionService | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.info: ServerInfo | None = None

    async def start(self) -> ServerInfo:
        cfg = self.settings.serving
        tokens = read_tokens(cfg.auth_tokens_file)
        if (cfg.tls_cert_file is None) != (cfg.tls_key_file is None):
            raise ConfigError(
                "serving.tls_cert_file and serving.tls_key_file go together: set both or neither"
            )
        limit_threads(cfg.model_threads)  # the event loop's thread scores small requests
        repository = load_repository(self.settings)
        self.store = open_online_store(self.settings)
        # Events are encoded and sent by a process of its own; this one pickles each call's
        # batch and writes it to the pipe on the event loop, between requests.
        self.events = EventLog(
            self.settings,
            self.metrics,
            capacity=cfg.event_buffer,
            producer_config=self._producer_config,
            nice=cfg.event_sender_nice,
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.events.start, loop)
        self.runtime = ModelRuntime(
            self.settings,
            self.serde,
            repository,
            open_artifact_store(self.settings),
            on_loaded=self._loaded,
            on_failed=self._failed,
            on_published=self._published,
            on_fallback=self._fell_back,
        )
        await asyncio.get_running_loop().run_in_executor(None, self.runtime.start)
        self.shadow = ShadowScorer(
            self.store,
            self.events,
            self.metrics,
            capacity=cfg.shadow_queue,
            max_entities=cfg.max_entities,
            max_key_length=cfg.max_id_length,
            model_threads=cfg.model_threads,
        ).start()
        self.service = PredictionService(
            cfg,
            runtime=self.runtime,
            store=self.store,
            event_log=self.events,
            metrics=self.metrics,
            shadow=self.shadow,
            tokens=tokens,
        )
        servers_before = grpc_server_ids()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # The queue that matters under overload is in gRPC's core: the asyncio server takes
                # one call at a time from it, so calls beyond what the event loop keeps up with wait
                # there, invisible to the handler (its in-flight count stays at a few), and were
                # answered seconds late (default bounds: 1,000 then 3,000). Bounded here, the core
                # refuses the excess at once, in C: no Python work, so the calls taken keep the
                # server's full throughput and wait at most this many calls' service time. Refusing
                # them in Python instead costs about half a call each (grpc's per-call machinery),
                # which at 3x capacity leaves no time for the calls admitted. Soft = hard limit:
                # deterministic, rather than gRPC's random early drop between the two.
                ("grpc.server.max_pending_requests", cfg.max_queued_calls),
                ("grpc.server.max_pending_requests_hard_limit", cfg.max_queued_calls),
                # Streams per connection, a backstop behind the service's own in-flight bound
                # (which counts and reports what it sheds). Not ``maximum_concurrent_rpcs``: its
                # Python-side limiter adds an asyncio condition and a task to every call (~10 % of
                # an empty handler's calls/s).
                ("grpc.max_concurrent_streams", cfg.max_in_flight + max(64, cfg.max_in_flight)),
            ],
        )
        predict = grpc.unary_unary_rpc_method_handler(
            self.service.Predict,
            request_deserializer=prediction_pb2.PredictRequest.FromString,
            response_serializer=prediction_pb2.PredictResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Predict": predict}),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, {"Predict": predict})
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
            credentials = grpc.ssl_server_credentials(
                [(cfg.tls_key_file.read_bytes(), cfg.tls_cert_file.read_bytes())]
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise HeadwaterError(f"cannot listen on {address}: is the port taken? (settings.serving.port)")
        # Everything loaded so far (libraries, models, descriptors) lives as long as the process:
        # out of the cyclic collector's sight, a full collection no longer walks it, which
        # otherwise stalls the event loop for milliseconds at a time (the latency tail).
        gc.collect()
        gc.freeze()
        await server.start()
        self._server = server
        ours = grpc_server_ids() - servers_before
        if len(ours) == 1:  # another server started meanwhile in this process: no such count
            self.metrics.refused_by_grpc.server_id = ours.pop()
            service = self.service
            self.metrics.refused_by_grpc.in_flight = lambda: service.in_flight.count
        metrics_port = self.metrics.serve_http(cfg.host, cfg.metrics_port)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        routes = self.runtime.routes
        models = tuple(f"{n}@{a} -> {m.version}" for (n, a), m in sorted(routes.aliases.items()))
        self.info = ServerInfo(cfg.host, port, metrics_port, cfg.tls_cert_file is not None, models)
        log.info(
            "serving on %s (metrics on %d): %s",
            self.info.target,
            metrics_port,
            ", ".join(models) or "no models",
        )
        return self.info

    # -- runtime callbacks (loader thread) ---------------------------------------------------------
    def _loaded(self, model: LoadedModel) -> None:
        self.metrics.model_loads.labels(model.name, model.version_label).inc()

    def _failed(self, mv: ModelVersion, exc: BaseException) -> None:
        self.metrics.model_load_failures.labels(mv.name, str(mv.version)).inc()
        if self.events is not None:
            self.events.alert(
                new_alert(
                    "model_load_failed",
                    f"{mv.name}:{mv.version}",
                    f"model {mv.name} version {mv.version} failed to load and is not served "
                    f"(the previous version keeps serving): {exc}",
                    {
                        "model": mv.name,
                        "version": str(mv.version),
                        "sha256": mv.artifact_sha256,
                        "error": type(exc).__name__,
                    },
                )
            )

    def _fell_back(self, name: str, alias: str, failed: int, model: LoadedModel) -> None:
        if self.events is not None:
            why = self.runtime.failure(name, failed) if self.runtime is not None else None
            self.events.alert(
                new_alert(
                    "model_fallback",
                    f"{name}@{alias}",
                    f"{name}@{alias} points at version {failed}, which cannot be loaded ({why}); serving "
                    f"version {model.version} instead, the newest loadable earlier version of the alias. "
                    "Fix or replace the artifact, or roll the alias back",
                    {
                        "model": name,
                        "alias": alias,
                        "failed_version": str(failed),
                        "serving_version": str(model.version),
                    },
                )
            )

    def _published(self, routes: Routes) -> None:
        for (name, alias), model in routes.aliases.items():
            self.metrics.model_serving.labels(f"{name}@{alias}").set(model.version)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop answering (in-flight calls get ``grace_s`` to finish), then the parts behind it."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        loop = asyncio.get_running_loop()
        if self.shadow is not None:
            await loop.run_in_executor(None, self.shadow.close)
        if self.runtime is not None:
            await loop.run_in_executor(None, self.runtime.stop)
        if self.events is not None:
            self.events.close()  # on the loop's thread: it drains there
        if self.service is not None:
            self.service.close()
        if self.store is not None:
            self.store.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: it halves the event loop's share of a call's cost."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional here
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve(settings: Settings, *, on_ready: object = None, stop: threading.Event | None = None) -> None:
    """Run a server in the foreground until ``stop`` is set (or the process is interrupted)."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    server = PredictionServer(settings)

    async def main() -> None:
        info = await server.start()
        if callable(on_ready):
            on_ready(info)
        try:
            if stop is None:
                await server.wait()
            else:
                await loop.run_in_executor(None, stop.wait)
        finally:
            await server.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class ServerThread:
    """A server on its own thread and event loop: ``info = ServerThread(settings).start()``."""

    def __init__(self, settings: Settings, *, event_producer_config: dict[str, object] | None = None) -> None:
        self.server = PredictionServer(settings, event_producer_config=event_producer_config)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.info: ServerInfo | None = None

    def start(self, timeout_s: float = 60.0) -> ServerInfo:
        def run() -> None:
            loop = _new_loop()
            asyncio.set_event_loop(loop)

            async def main() -> None:
                try:
                    self.info = await self.server.start()
                finally:
                    self._ready.set()
                try:
                    await loop.run_in_executor(None, self._stop.wait)
                finally:
                    await self.server.stop(1.0)

            try:
                loop.run_until_complete(main())
            except BaseException as exc:
                self._error = exc
                self._ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="prediction-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise HeadwaterError(f"prediction server not ready within {timeout_s}s")
        if self._error is not None or self.info is None:
            raise HeadwaterError(f"prediction server failed to start: {self._error}") from self._error
        return self.info

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
