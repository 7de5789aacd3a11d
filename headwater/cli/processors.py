"""`headwater process`: run stream processors."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from headwater.cli.common import console, settings_of
from infra.stack import PROCESSORS_READY
from processors.worker import run_processors

__all__ = ["register"]


def process(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Processors to run (default: all).")] = None,
    until_caught_up: Annotated[
        bool, typer.Option("--until-caught-up", help="Stop once every input is drained.")
    ] = False,
) -> None:
    """Run the feature processors and the online-store writer until interrupted (SIGINT/SIGTERM)."""
    settings = settings_of(ctx)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    counts = run_processors(settings, names, stop, until_caught_up=until_caught_up, on_ready=_announce)
    for name, n in counts.items():
        console.print(f"{name}: {n} events processed")


def _announce(names: list[str]) -> None:
    console.print(f"{PROCESSORS_READY} {', '.join(names)}")
    console.file.flush()


def register(app: typer.Typer) -> None:
    app.command()(process)
