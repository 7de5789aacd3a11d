"""`headwater models ...` on the real broker, with real trained pipelines (tests.registry.real_models).

The commands are mounted on a bare Typer app as the CLI mounts them (``register(app)``), with
the test's settings as the context object; one test runs the real `headwater` entry point in
a subprocess for the one-line error message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner, Result

from headwater.cli.models import register
from headwater.errors import ConfigError, HeadwaterError, NotFoundError
from headwater.settings import Settings
from registry import PromotionRefused, Registry
from streams.serde import Serde
from tests.registry.real_models import NAME, RealModels, register_real

runner = CliRunner()


def invoke(settings: Settings, *args: str) -> Result:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Stands in for the real root callback, which puts the Settings in ctx.obj."""

    register(app)
    return runner.invoke(app, ["models", *args], obj=settings)


def ok(settings: Settings, *args: str) -> str:
    result = invoke(settings, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_models_commands(settings: Settings, serde: Serde, trained: RealModels) -> None:
    _, models = trained
    with Registry(settings, serde, actor="dagster") as registry:
        weak = register_real(registry, *models["weak"])
        strong = register_real(registry, *models["strong"])
    assert "no models registered" not in ok(settings, "list")

    # promote: first (no incumbent), then the gate with the real holdout evaluator
    assert f"promoted {NAME}:1 to {NAME}@production" in ok(settings, "promote", NAME, "1")
    out = ok(settings, "promote", NAME, "2")
    assert "(was version 1)" in out and "gate: candidate roc_auc" in out
    refused = invoke(settings, "promote", NAME, "1")
    assert isinstance(refused.exception, PromotionRefused) and "does not beat" in str(refused.exception)
    no_reason = invoke(settings, "promote", NAME, "1", "--force")
    assert isinstance(no_reason.exception, PromotionRefused) and "needs a reason" in str(no_reason.exception)
    assert "forced: canary" in ok(
        settings, "promote", NAME, "1", "--alias", "staging", "--force", "--reason", "canary"
    )

    listed = json.loads(ok(settings, "list", "--format", "json"))
    assert listed == [{
        "name": NAME, "versions": [1, 2], "archived": [], "aliases": {"production": 2, "staging": 1},
        "shadows": {}, "owner": "", "last_registered": strong.registered_at,
    }]  # fmt: skip
    shown = json.loads(ok(settings, "show", NAME, "--format", "json"))
    assert shown["version"] == 2 and shown["aliases"] == ["production"]
    assert shown["artifact_sha256"] == strong.artifact_sha256 and shown["feature_refs"] == [
        "item_activity:ctr_7d"
    ]
    assert [m["version"] for m in shown["alias_history"]["production"]] == [1, 2]
    assert f"{NAME}:1" in ok(settings, "show", f"{NAME}@staging")

    # rollback: instant, recorded
    missing = invoke(settings, "rollback", NAME)
    assert missing.exit_code != 0  # --reason is required
    assert "from version 2 to version 1" in ok(settings, "rollback", NAME, "--reason", "bad canary")
    shown = json.loads(ok(settings, "show", f"{NAME}:1", "--format", "json"))
    last = shown["alias_history"]["production"][-1]
    assert last["rollback"] and last["reason"] == "bad canary" and last["previous_version"] == 2

    # lineage
    using = json.loads(ok(settings, "lineage", "--feature", "item_activity:ctr_7d", "--format", "json"))
    assert [u["model"] for u in using] == [f"{NAME}:2"]
    assert json.loads(ok(settings, "lineage", "--feature", "item_activity", "--format", "json"))[0][
        "uses"
    ] == ["item_activity:ctr_7d"]
    trained_on = json.loads(ok(settings, "lineage", f"{NAME}:2", "--format", "json"))
    assert trained_on["model"] == f"{NAME}:2" and trained_on["feature_refs"] == ["item_activity:ctr_7d"]
    assert "trained on" in ok(settings, "lineage", NAME)
    both = invoke(settings, "lineage", NAME, "--feature", "x")
    assert isinstance(both.exception, ConfigError)

    # archive: refused while an alias points at it
    refused_archive = invoke(settings, "archive", NAME, "1").exception
    assert isinstance(refused_archive, HeadwaterError) and "points at" in str(refused_archive)
    assert f"archived {NAME}:2" in ok(settings, "archive", NAME, "2", "--reason", "superseded")
    assert json.loads(ok(settings, "show", f"{NAME}:2", "--format", "json"))["archived"] is True
    assert weak.version == 1

    unknown = invoke(settings, "show", "nope")
    assert isinstance(unknown.exception, NotFoundError) and f"known models: {NAME}" in str(unknown.exception)


def test_errors_are_one_line(settings: Settings) -> None:
    env = {
        **os.environ,
        "HEADWATER_BOOTSTRAP_SERVERS": str(settings.bootstrap_servers),
        "HEADWATER_TOPIC_PREFIX": settings.topic_prefix,
        "HEADWATER_DATA_DIR": str(settings.data_dir),
    }
    result = subprocess.run(
        [sys.executable, "-m", "headwater.cli", "models", "promote", "ghost", "1", "--force"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "headwater: error: forcing a promotion of ghost:1 to production needs a reason (--reason)"
    ]
    result = subprocess.run(
        [sys.executable, "-m", "headwater.cli", "models", "show", "ghost@staging"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "headwater: error: unknown model 'ghost'; known models: none registered yet"
    )


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_list_empty(settings: Settings, fmt: str) -> None:
    out = ok(settings, "list", "--format", fmt)
    assert out.strip() == ("no models registered yet" if fmt == "table" else "[]")
