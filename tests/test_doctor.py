"""`headwater doctor` on a data directory the real platform wrote (broker, processors, lake sink,
online-store writer, registry), clean and then damaged the ways disks and people damage files."""

from __future__ import annotations

import itertools
import os
import random
import re
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression

from headwater.sample_data import merged_events
from headwater.settings import Settings
from processors.worker import run_processors
from registry import Registry
from streams.producer import EventProducer
from streams.serde import Serde
from tests.conftest import create_topics
from tests.test_cli import invoke

CLICKS = 1500


@pytest.fixture(scope="module")
def stack(broker_settings: Settings, serde: Serde, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A data directory as a running platform leaves it: the lake (clicks, feature updates, the
    models topic), the online store, two processors' state, a registered model and its holdout."""
    settings = broker_settings.model_copy(
        update={"topic_prefix": f"doc{uuid.uuid4().hex[:6]}.", "data_dir": tmp_path_factory.mktemp("doctor")}
    )
    create_topics(settings)
    clicks = itertools.islice((r for topic, r in merged_events() if topic == "clicks"), CLICKS)
    with EventProducer(settings, serde) as producer:
        for record in clicks:
            producer.send("clicks", record)
        producer.flush()
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 3))
    model = LogisticRegression().fit(x, x[:, 0] > 0)
    with Registry(settings, serde, actor="test") as registry:
        uri, sha = registry.artifacts.put(b"holdout rows", suffix=".parquet")
        registry.register(
            "ctr", sio.dumps(model), feature_refs=["user_activity:clicks_7d"],
            metadata={"holdout_uri": uri, "holdout_sha256": sha},
        )  # fmt: skip
    features = ["features-user_activity", "features-item_activity"]
    run_processors(settings, features, threading.Event(), until_caught_up=True)
    run_processors(settings, ["online-store-writer", "lake-sink"], threading.Event(), until_caught_up=True)
    return settings


def overwrite_page(env_dir: Path, needle: bytes, seed: int) -> None:
    """Garbage over every LMDB page that holds ``needle`` (a key the store wrote): copy-on-write
    leaves earlier copies of a page in the file, and the one in use may be any of them."""
    psize = os.sysconf("SC_PAGE_SIZE")  # LMDB's page size: the OS's (the environment may be open here)
    data_file = env_dir / "data.mdb"
    data = data_file.read_bytes()
    pages = {m.start() // psize for m in re.finditer(re.escape(needle), data)}
    assert pages, f"{needle!r} is not in {data_file}"
    rng = random.Random(seed)
    with data_file.open("r+b") as f:
        for page in sorted(pages):
            f.seek(page * psize)
            f.write(rng.randbytes(psize))


def test_doctor_reports_clean_data_clean_and_finds_each_damage(stack: Settings) -> None:
    clean = invoke(stack, "doctor")

    assert clean.exit_code == 0, clean.output
    lines = clean.stdout.splitlines()
    assert lines[-1] == "doctor: 0 errors, 0 warnings", clean.stdout
    lake, online, state, artifacts = (next(line for line in lines if line.startswith(p)) for p in (
        "lake ", "online store ", "processor state ", "registry artifacts ",
    ))  # fmt: skip
    assert int(lake.split(": ", 1)[1].split()[0].replace(",", "")) >= 3  # clicks, updates, models
    assert "records read and decoded" in online and " 0 records" not in online
    assert (
        "4 stores" in state  # two feature processors, the writer, the lake sink
        and "1 versions, 2 blobs verified (registry read from the models topic)" in artifacts
    )

    lake_dir = stack.lake_dir
    deleted = sorted((lake_dir / "clicks").glob("*/*.parquet"))[0]
    truncated = sorted((lake_dir / "feature-updates").glob("*/*.parquet"))[0]
    deleted.unlink()
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    user = next(r for topic, r in merged_events() if topic == "clicks")["user_id"]
    overwrite_page(stack.online_store_path, b"user_activity\0" + user.encode(), seed=1)
    overwrite_page(stack.data_dir / "state" / "features-user_activity", user.encode(), seed=2)
    (artifact,) = Path(stack.artifact_store_url).rglob("*.skops")
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit
    artifact.write_bytes(bytes(blob))

    damaged = invoke(stack, "doctor")

    assert damaged.exit_code == 1, damaged.output
    out = damaged.stdout
    rel = lambda p: f"{p.parents[1].name}/{p.parent.name}/{p.name}"  # noqa: E731
    assert f"ERROR {rel(deleted)}: missing: the lake wrote it" in out
    assert (
        f"ERROR {rel(truncated)}: truncated: {len(data) - 100:,} bytes, the lake wrote {len(data):,}" in out
    )
    assert any(line.startswith("online store") and line.endswith("FAILED") for line in out.splitlines())
    assert any(line.startswith("processor state") and line.endswith("FAILED") for line in out.splitlines())
    assert "ERROR ctr:1 artifact: artifact" in out and "is corrupt or was tampered with" in out
    summary = out.splitlines()[-1]
    assert summary.startswith("doctor: ") and int(summary.split()[1]) >= 5, out
