"""Real parts for the serving tests: trained ctr_model pipelines, the registry on the real broker,
the LMDB online store with features in it, and real gRPC servers on free ports."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest

from features.examples.clickstream import repository as clickstream_repository
from features.repository import FeatureRepository
from headwater.client import PredictionClient
from headwater.settings import Settings
from models.artifact import dump_pipeline
from models.examples.clickstream import specs
from models.pipeline import ModelPipeline
from models.spec import ModelSpec
from registry.registry import Registry
from registry.state import ModelVersion
from serving.online_store import open_online_store
from serving.server import ServerInfo, ServerThread
from tests.conftest import create_topics

MODEL = "ctr_model"
USERS = [f"u{i:03d}" for i in range(20)]
ITEMS = [str(i) for i in range(1, 31)]


@pytest.fixture(scope="session")
def repository() -> FeatureRepository:
    return clickstream_repository()


@pytest.fixture(scope="session")
def ctr_spec() -> ModelSpec:
    return next(s for s in specs() if s.name == MODEL)


def training_frame(spec: ModelSpec, repository: FeatureRepository, seed: int, n: int = 4000) -> pd.DataFrame:
    """A synthetic training set with every stored input of the spec, the position and a label."""
    rng = np.random.default_rng(seed)
    pipeline = ModelPipeline(spec, repository)
    data: dict[str, Any] = {"user_id": ["u"] * n, "item_id": ["1"] * n}
    for fs, names in pipeline.reads.items():
        for name in names:
            data[f"{fs}:{name}"] = rng.integers(0, 50, n).astype(float)
    data["position"] = rng.integers(1, 4, n)
    signal = data["user_activity:clicks_24h"] / 50 + data["item_activity:ctr_24h"] / 50
    data["clicked"] = (rng.random(n) < 0.05 + 0.4 * signal).astype(int)
    return pd.DataFrame(data)


@pytest.fixture(scope="session")
def pipelines(ctr_spec: ModelSpec, repository: FeatureRepository) -> list[ModelPipeline]:
    """Two fitted versions of ctr_model (different training data, so different scores)."""
    return [
        ModelPipeline(ctr_spec, repository).fit(training_frame(ctr_spec, repository, seed)) for seed in (1, 2)
    ]


@pytest.fixture(scope="session")
def artifacts(pipelines: list[ModelPipeline]) -> list[bytes]:
    return [dump_pipeline(p) for p in pipelines]


def register(
    settings: Settings, spec: ModelSpec, artifact: bytes, *, alias: str | None = "production"
) -> ModelVersion:
    with Registry(settings, actor="tests") as registry:
        mv = registry.register(
            spec.name,
            artifact,
            feature_refs=list(spec.features),
            metrics={"roc_auc": 0.5},
            metadata={"spec": spec.model_dump(mode="json")},
        )
        if alias is not None:
            registry.promote(spec.name, mv.version, alias, force=True, reason="tests")
        return mv


def feature_values(pipeline: ModelPipeline, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """feature set -> entity -> values, for USERS and ITEMS."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for fs, names in pipeline.reads.items():
        entities = USERS if fs == "user_activity" else ITEMS
        out[fs] = {e: {n: float(rng.integers(0, 50)) for n in names} for e in entities}
    return out


def seed_online_store(
    settings: Settings, values: dict[str, dict[str, dict[str, float]]], event_time_ms: int
) -> None:
    with open_online_store(settings) as store:
        for fs, rows in values.items():
            store.put_batch(fs, [(e, event_time_ms, v) for e, v in rows.items()])


def serving_settings(base: Settings, tmp: Path, **serving: Any) -> Settings:
    """Fresh topics and data directory on the session broker, the server on free ports."""
    settings = base.model_copy(
        update={
            "topic_prefix": f"s{uuid.uuid4().hex[:8]}.",
            "data_dir": tmp,
            "serving": base.serving.model_copy(update={"port": 0, "metrics_port": 0, **serving}),
        }
    )
    create_topics(settings)
    return settings


@dataclass
class Served:
    settings: Settings
    info: ServerInfo
    thread: ServerThread
    values: dict[str, dict[str, dict[str, float]]]
    event_time_ms: int
    version: ModelVersion

    def client(self, **kwargs: Any) -> PredictionClient:
        return PredictionClient(self.info.target, **kwargs)


def start_served(settings: Settings, spec: ModelSpec, artifact: bytes, pipeline: ModelPipeline) -> Served:
    mv = register(settings, spec, artifact)
    values = feature_values(pipeline, seed=5)
    event_time_ms = time.time_ns() // 1_000_000 - 60_000
    seed_online_store(settings, values, event_time_ms)
    thread = ServerThread(settings)
    info = thread.start()
    return Served(settings, info, thread, values, event_time_ms, mv)


def at_once(served: Served, requests: list[Any], timeout_s: float = 60.0) -> list[tuple[str, str]]:
    """Send ``requests`` all at once on one channel: each one's status name and details."""
    out = []
    with served.client() as client:
        calls = [client._call.future(request, timeout=timeout_s) for request in requests]
        for call in calls:
            try:
                call.result()
                out.append(("OK", ""))
            except grpc.RpcError as exc:
                out.append((exc.code().name, exc.details() or ""))
    return out


def offline_rows(
    served: Served, pipeline: ModelPipeline, pairs: list[tuple[str, str]], position: int
) -> list[dict[str, Any]]:
    """The rows the offline pipeline sees for the same entities: stored values under their refs."""
    rows = []
    for user, item in pairs:
        row: dict[str, Any] = {"user_id": user, "item_id": item, "position": position}
        for fs, entities in served.values.items():
            entity = user if fs == "user_activity" else item
            for name, value in entities.get(entity, {}).items():
                row[f"{fs}:{name}"] = value
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def served(
    broker_settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
    ctr_spec: ModelSpec,
    artifacts: list[bytes],
    pipelines: list[ModelPipeline],
) -> Iterator[Served]:
    """The session's server: ctr_model v1 at production, features for USERS x ITEMS online."""
    settings = serving_settings(broker_settings, tmp_path_factory.mktemp("serving"), client_rate_limit=0.0)
    s = start_served(settings, ctr_spec, artifacts[0], pipelines[0])
    yield s
    s.thread.stop()
