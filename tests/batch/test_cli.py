"""The code location from outside: the Dagster CLI backfills a range, the web server serves the graph.

Both run ``batch.definitions`` in a subprocess, with the test's settings handed over the
documented way (``HEADWATER_CONFIG`` pointing at a YAML file) and a Dagster home of their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from batch.assets import Warehouse
from headwater.settings import Settings
from registry import Registry
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def code_location_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "headwater.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    home = tmp_path / "dagster-home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADWATER_", "DAGSTER_"))}
    return {**env, "HEADWATER_CONFIG": str(config), "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}


def test_cli_backfills_a_partition_range_in_one_run(batch_settings: Settings, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(BIN / "dagster"), "asset", "materialize", "-m", "batch.definitions",
            "--select", "*", "--partition-range", "2019-11-24...2019-11-25",
        ],
        cwd=ROOT, env=code_location_env(batch_settings, tmp_path), capture_output=True, text=True,
        timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    warehouse = Warehouse(batch_settings)
    assert all(warehouse.path("raw_clicks", day).is_file() for day in ("2019-11-24", "2019-11-25"))
    assert warehouse.path("training_sets", "2019-11-24..2019-11-25", model="ctr_model").is_file()
    for day in ("2019-11-24", "2019-11-25"):
        assert warehouse.path("batch_predictions", day, model="ctr_model").is_file()
    with Registry(batch_settings, actor="test") as registry:
        assert registry.resolve("ctr_model@production").version == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture()
def webserver(batch_settings: Settings, tmp_path: Path) -> Iterator[str]:
    """``dagster dev -m batch.definitions`` (web server and daemon) on a free port; stopped by its group."""
    port = free_port()
    log = open(tmp_path / "webserver.log", "w")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-m", "batch.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=code_location_env(batch_settings, tmp_path), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}/graphql"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def graphql(url: str, query: str) -> dict[str, object] | None:
    request = urllib.request.Request(
        url, json.dumps({"query": query}).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            data: dict[str, object] = json.loads(response.read())["data"]
            return data
    except (urllib.error.URLError, ConnectionError, KeyError):
        return None


def test_dagster_dev_loads_the_definitions(webserver: str) -> None:
    query = "{ assetNodes { assetKey { path } } }"
    wait_for(lambda: bool((graphql(webserver, query) or {}).get("assetNodes")), 90, "the Dagster web server")
    data = graphql(webserver, query)
    assert data is not None
    keys = {"/".join(node["assetKey"]["path"]) for node in data["assetNodes"]}  # type: ignore[attr-defined]
    stages = ("training_set", "model", "evaluation", "registered_model", "batch_predictions")
    assert {"raw_clicks", "feature_values", *(f"ctr_model/{s}" for s in stages)} <= keys
    schedules = graphql(
        webserver,
        "{ repositoriesOrError { ... on RepositoryConnection { nodes { schedules { name cronSchedule } } } "
        "} }",
    )
    assert schedules is not None
    (repo,) = schedules["repositoriesOrError"]["nodes"]  # type: ignore[index]
    assert [(s["name"], s["cronSchedule"]) for s in repo["schedules"]] == [("daily_schedule", "0 1 * * *")]
