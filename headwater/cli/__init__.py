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

from headwater.cli import (
    broker,
    demo,
    doctor,
    events,
    features,
    models,
    processors,
    schemas,
    serve,
    sql,
    topics,
)
from headwater.errors import HeadwaterError
from headwater.settings import Settings, load_settings

__all__ = ["app", "main"]

log = logging.getLogger(__name__)

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
        logging.getLogger(_RDKAFKA_LOGGER).setLevel(logging.NOTSET)
    overrides = {"data_dir": data_dir} if data_dir is not None else {}
    if isinstance(ctx.obj, Settings):  # invoked programmatically (tests, embedding) with ready settings
        ctx.obj = ctx.obj.model_copy(update=overrides)
    else:
        ctx.obj = load_settings(config, **overrides)


for _module in (broker, topics, schemas, events, features, models, processors, serve, sql, doctor, demo):
    _module.register(app)


# librdkafka's own log lines (connection refused, retries) say what the command's error message
# says better: shown from -v on, so that a failure is the one line of _fail.
_RDKAFKA_LOGGER = "streams.rdkafka"


def _one_line(message: str) -> str:
    """A message on one line: its lines joined with "; " (a ClickHouse error and the query it was
    in, a service's last log lines), runs of spaces collapsed."""
    lines = (" ".join(line.split()) for line in message.splitlines())
    return "; ".join(line for line in lines if line)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"headwater: error: {_one_line(message)}", err=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: run the app; every error is one line on stderr, never a traceback
    (an unexpected one is logged with its traceback at -vv)."""
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger(_RDKAFKA_LOGGER).setLevel(logging.CRITICAL)
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
    except OSError as exc:  # the machine said no (permissions, a full disk, a file that is a folder)
        log.debug("%s", type(exc).__name__, exc_info=True)
        _fail(str(exc) or f"{type(exc).__name__} (run with -vv for the traceback)")
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # a bug: still one line, the traceback at -vv
        log.debug("unexpected error", exc_info=True)
        _fail(f"unexpected {type(exc).__name__}: {exc or 'no message'} (run with -vv for the traceback)")
    sys.exit(code if isinstance(code, int) else 0)
