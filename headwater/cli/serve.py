"""`headwater serve`: the gRPC prediction service, in the foreground."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from types import FrameType
from typing import Annotated

import typer
from confluent_kafka import KafkaException

from headwater.cli.common import admin_client, console, settings_of
from headwater.errors import ConfigError, HeadwaterError
from headwater.settings import ServingSettings, Settings
from infra.services import Services

__all__ = ["register"]

_PORT = {"min": 0, "max": 65535}


def _check_not_running(settings: Settings) -> None:
    """One service per data directory: `headwater up` runs one in the background (whose own
    ``headwater serve`` finds itself in the service file)."""
    info = Services(settings).info("serving")
    if info is not None and info.pid != os.getpid():
        raise HeadwaterError(
            f"a prediction service is already running for data dir {settings.data_dir} (pid {info.pid}, "
            "started by `headwater up`): use it, stop it with `headwater down`, or pass another --data-dir"
        )


def _check_kafka(settings: Settings) -> None:
    """The service reads the registry from Kafka before it answers anything: without Kafka it
    cannot start, and says so in one line (rather than through its event sender's log)."""
    try:
        admin_client(settings).list_topics(timeout=10)  # a HeadwaterError without a broker to find
    except KafkaException as exc:
        where = settings.bootstrap_servers or "the embedded broker"
        raise HeadwaterError(
            f"Kafka at {where} does not answer ({exc.args[0] if exc.args else exc}): is the broker up? "
            "(`headwater status`)"
        ) from exc


def _check_free(host: str, port: int, what: str, option: str) -> None:
    """Bind ``host:port`` and let go, so that a taken port or a bad address is one clear line before
    anything starts (gRPC would raise a RuntimeError after starting the event sender). Port 0
    checks the address alone."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} (serving.host, --host)") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no owner
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise HeadwaterError(
                    f"{what} port {host}:{port} is taken, by another prediction service or another "
                    f"program: choose another with {option} (0 picks a free one)"
                ) from exc
            raise ConfigError(f"cannot listen on {host}:{port} ({what} port): {exc.strerror}") from exc


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: serving.host).")] = None,
    port: Annotated[
        int | None, typer.Option(help="gRPC port; 0 picks one (default: serving.port).", **_PORT)
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (default: serving.metrics_port).", **_PORT)
    ] = None,
) -> None:
    """Serve predictions over gRPC until interrupted (SIGINT/SIGTERM), following the model registry."""
    from serving.server import READY_LINE, ServerInfo
    from serving.server import serve as run

    settings = settings_of(ctx)
    overrides = {
        k: v for k, v in {"host": host, "port": port, "metrics_port": metrics_port}.items() if v is not None
    }
    if overrides:
        cfg = ServingSettings.model_validate({**settings.serving.model_dump(), **overrides})
        settings = settings.model_copy(update={"serving": cfg})
    _check_not_running(settings)
    cfg = settings.serving
    _check_free(cfg.host, cfg.port, "gRPC", "--port")
    _check_free(cfg.host, cfg.metrics_port, "metrics", "--metrics-port")
    _check_kafka(settings)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def ready(info: ServerInfo) -> None:
        scheme = "grpcs" if info.tls else "grpc"
        models = ", ".join(info.models) or "no model promoted yet"
        console.print(
            f"{READY_LINE} {scheme}://{info.target} metrics http://{info.host}:{info.metrics_port}/metrics"
        )
        console.print(f"models: {models}")
        console.file.flush()

    run(settings, on_ready=ready, stop=stop)
    console.print("serving stopped")


def register(app: typer.Typer) -> None:
    app.command()(serve)
