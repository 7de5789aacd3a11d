"""`headwater serve` in its own process, as `headwater up` starts it, and the SDK client against it."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from headwater.client import PredictionClient
from headwater.processes import terminate
from headwater.settings import Settings
from infra.services import Services
from models.pipeline import ModelPipeline
from models.spec import ModelSpec
from serving.server import READY_LINE
from tests.serving.conftest import (
    ITEMS,
    MODEL,
    USERS,
    feature_values,
    register,
    seed_online_store,
    serving_settings,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def test_headwater_serve_prints_a_ready_line_and_answers(
    broker_settings: Settings,
    tmp_path: Path,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
) -> None:
    settings = serving_settings(broker_settings, tmp_path)
    register(settings, ctr_spec, artifacts[0])
    seed_online_store(settings, feature_values(pipelines[0], 5), 1_700_000_000_000)
    config = Services(settings).settings_file()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "headwater.cli",
            "--config",
            str(config),
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(
            lambda: any(READY_LINE in line for line in lines) or proc.poll() is not None, 60, "the ready line"
        )
        ready = next((line for line in lines if READY_LINE in line), None)
        assert ready is not None, "".join(lines)
        target = re.search(r"grpc://(\S+)", ready)
        assert target is not None
        assert any("ctr_model@production -> 1" in line for line in lines)
        with PredictionClient(target.group(1)) as client:
            (result,) = client.predict(
                MODEL, {"user_id": USERS[0], "item_id": ITEMS[0]}, request_features={"position": 1}
            )
        assert result.model_version == 1 and result.score is not None
    finally:
        terminate(proc.pid, "headwater.cli", 15.0)
    proc.wait(15)
    reader.join(5)
    assert any("serving stopped" in line for line in lines), "".join(lines)
