"""The `headwater` command line.

The root callback builds the one :class:`~headwater.settings.Settings` object of the
invocation (from ``--config``, ``HEADWATER_*`` variables and ``--data-dir``) and passes it
down as the click context object. One module per command group registers its commands.
:func:`main`, the console entry point, turns bad arguments and every
:class:`~headwater.errors.HeadwaterError` into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from confluent_kafka import KafkaException

from headwater.cli import broker, demo, events, features, models, processors, schemas, serve, sql, topics
from headwater.errors import HeadwaterError
from headwater.settings import Settings, load_settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="headwater",
    help="Headwater: an event-driven ML platform centred on Kafka.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML settings file (else HEADWATER_CONFIG, HEADWATER_* variables)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Broker state, lake and online store [default: .headwater]."),
    ] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="-v info, -vv debug logs.")] = 0,
) -> None:
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    overrides = {"data_dir": data_dir} if data_dir is not None else {}
    if isinstance(ctx.obj, Settings):  # invoked programmatically (tests, embedding) with ready settings
        ctx.obj = ctx.obj.model_copy(update=overrides)
    else:
        ctx.obj = load_settings(config, **overrides)


for _module in (broker, topics, schemas, events, features, models, processors, serve, sql, demo):
    _module.register(app)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"headwater: error: {message}", err=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: run the app, never show a traceback for a known error."""
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        code = app(args=argv, prog_name="headwater", standalone_mode=False)
    except typer.TyperException as exc:  # typer's (vendored click's) usage and file errors
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group called without a command: its help
            typer.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)  # usage errors know the command they belong to
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", exc.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except HeadwaterError as exc:
        _fail(str(exc))
    except KafkaException as exc:  # not translated below: say what the client said, and where to look
        _fail(f"Kafka: {exc.args[0] if exc.args else exc}; is the broker up? (`headwater status`)")
    sys.exit(code if isinstance(code, int) else 0)
