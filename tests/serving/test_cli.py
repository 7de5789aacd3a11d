"""`headwater serve` as `headwater up` starts it (in the background), found and called by the client."""

from __future__ import annotations

from pathlib import Path

import pytest

from headwater.client import PredictionClient
from headwater.settings import Settings
from infra.services import Services
from infra.stack import serving_target
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
    services = Services(settings)  # as `headwater up` starts it: in the background, on free ports
    info = services.start("serving", ["serve"], ready=READY_LINE, timeout_s=120)
    try:
        target = serving_target(settings)
        assert "ctr_model@production -> 1" in Path(info.log_file).read_text()
        with PredictionClient(target) as client:
            (result,) = client.predict(
                MODEL, {"user_id": USERS[0], "item_id": ITEMS[0]}, request_features={"position": 1}
            )
        assert result.model_version == 1 and result.score is not None
    finally:
        assert services.stop("serving")
    assert services.info("serving") is None
