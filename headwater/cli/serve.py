"""`headwater serve`: the gRPC prediction service, in the foreground."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from headwater.cli.common import console, settings_of

__all__ = ["register"]


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port; 0 picks one (default: serving.port).")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (default: serving.metrics_port).")
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
        settings = settings.model_copy(update={"serving": settings.serving.model_copy(update=overrides)})
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
