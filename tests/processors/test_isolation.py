"""Processors run isolated, finish in dependency order, and never crash-loop; on both engines.

Real broker, real processors (``processors.worker.run_processors``, and ``headwater process``
as a subprocess for restarts), real LMDB and Parquet lake; the real clickstream sample.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from headwater.errors import HeadwaterError
from headwater.settings import Settings
from processors.lake import LakeReader
from processors.worker import run_processors
from serving.online_store import open_online_store
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog
from tests.conftest import SCHEMAS
from tests.processors.test_faust_engine import engine, read_all
from tests.processors.test_feature_processors import clickstream  # noqa: F401 - a fixture
from tests.processors.test_restore import model_event

ENGINES = ["native", "faust"]
FEATURE_PROCESSORS = ["features-user_activity", "features-item_activity"]
GARBAGE = b"\x00not an avro event"


def publish(settings: Settings, serde: Serde, clicks: list[dict[str, Any]], *, models: bool = False) -> None:
    """The clicks with, halfway, bytes that are no event (every reader of clicks dead-letters them)."""
    half = len(clicks) // 2
    with EventProducer(settings, serde) as producer:
        for i, record in enumerate(clicks):
            producer.send("clicks", record)
            if i == half:
                producer.send_raw(TopicCatalog(settings).name("clicks"), GARBAGE, key=b"bad", partition=1)
        if models:  # the registry's events: the lake sink must archive them whatever else is down
            for version in (1, 2):
                producer.send("models", model_event("ctr", version))
            producer.send("models", model_event("ctr", 2, "production"))
        producer.flush()


def lake_ids(settings: Settings, serde: Serde, topic: str) -> list[str]:
    table = LakeReader(settings, serde.catalog).read_topic(topic)
    return sorted(table["event_id"].to_pylist()) if len(table) else []


def assert_online_store_has_every_entity(settings: Settings, updates: list[dict[str, Any]]) -> None:
    """Every entity the updates name is in the online store (none left behind by an early stop)."""
    with open_online_store(settings) as store:
        for fs in ("user_activity", "item_activity"):
            keys = sorted({u["entity_key"] for u in updates if u["feature_set"] == fs})
            rows = store.get_batch(fs, keys, ["impressions_7d"], now_ms=max(u["event_time"] for u in updates))
            assert [key for key, row in zip(keys, rows, strict=True) if row.event_time_ms is None] == [], fs


def statuses(settings: Settings) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in (settings.state_dir / "processors").glob("*.json")}


@pytest.mark.parametrize("kind", ENGINES)
def test_until_caught_up_runs_every_processor_in_dependency_order(
    settings: Settings,
    serde: Serde,
    clickstream: list[dict[str, Any]],  # noqa: F811 - the fixture
    kind: str,
) -> None:
    """One ``run_processors(all, until_caught_up)``: the online-store writer and the lake sink
    finish only after the feature processors have, having read all they wrote."""
    s = engine(settings, kind, kind)
    publish(s, serde, clickstream[2000:2600])
    counts = run_processors(s, None, threading.Event(), until_caught_up=True)

    updates = read_all(s, serde, "feature-updates")
    assert counts["online-store-writer"] == len(updates) >= 2 * 600  # an update per click and feature set
    assert_online_store_has_every_entity(s, updates)
    assert lake_ids(s, serde, "feature-updates") == sorted(u["event_id"] for u in updates)
    letters = read_all(s, serde, "dead-letters")
    from_features = sorted(
        d["event_id"] + d["consumer"] for d in letters if d["consumer"] in FEATURE_PROCESSORS
    )
    assert len(from_features) == 2  # the garbage, by both feature processors
    archived = LakeReader(s, serde.catalog).read_topic("dead-letters")
    in_lake = sorted(
        e + c for e, c in zip(archived["event_id"].to_pylist(), archived["consumer"].to_pylist(), strict=True)
    )
    assert [x for x in in_lake if any(x.endswith(f) for f in FEATURE_PROCESSORS)] == from_features
    assert {n: st["state"] for n, st in statuses(s).items()} == dict.fromkeys(counts, "caught up")


def corrupt_online_store(settings: Settings) -> None:
    """An online store whose LMDB meta pages are garbage: it cannot be opened."""
    with open_online_store(settings) as store:
        store.put_batch("user_activity", [("u-old", 1, {"impressions_7d": 1})])
    data = settings.online_store_path / "data.mdb"
    with data.open("r+b") as f:
        f.write(os.urandom(8192))


def unwritable_lake(settings: Settings) -> Settings:
    """Settings whose lake folder is a file (root writes anywhere, so permissions would not do)."""
    blocker = settings.data_dir / "lake-is-a-file"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    return settings.model_copy(
        update={"offline_store": settings.offline_store.model_copy(update={"lake_dir": blocker})}
    )


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("broken", ["online-store-writer", "lake-sink"])
def test_a_failing_processor_does_not_stop_the_others(
    settings: Settings,
    serde: Serde,
    clickstream: list[dict[str, Any]],  # noqa: F811 - the fixture
    kind: str,
    broken: str,
) -> None:
    s = engine(settings, f"{kind}-{broken}", kind)
    if broken == "online-store-writer":
        corrupt_online_store(s)
    else:
        s = unwritable_lake(s)
    publish(s, serde, clickstream[3000:3400], models=True)

    with pytest.raises(HeadwaterError) as failed:
        run_processors(s, None, threading.Event(), until_caught_up=True)
    assert re.search(rf"processor\(s\) failed: {broken}: ", str(failed.value))
    assert "\n" not in str(failed.value)  # one line for `headwater process` to print
    state = statuses(s)
    assert state[broken]["state"] == "failed" and state[broken]["error"]
    healthy = [n for n in state if n != broken]
    assert {n: state[n]["state"] for n in healthy} == dict.fromkeys(healthy, "caught up")

    updates = read_all(s, serde, "feature-updates")  # the feature processors went on
    assert {u["feature_set"] for u in updates} == {"user_activity", "item_activity"} and len(updates) >= 800
    if broken == "online-store-writer":
        # The lake sink kept archiving: the registry's events above all, and every update.
        assert lake_ids(s, serde, "models") == sorted(m["event_id"] for m in read_all(s, serde, "models"))
        assert len(lake_ids(s, serde, "models")) == 3
        assert lake_ids(s, serde, "feature-updates") == sorted(u["event_id"] for u in updates)
        assert len(lake_ids(s, serde, "clicks")) == 400
    else:
        assert_online_store_has_every_entity(s, updates)


def run_cli(config: Path, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "headwater.cli", "--config", str(config), "process", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)


@pytest.mark.parametrize("kind", ENGINES)
def test_restart_never_crash_loops_on_a_record_it_cannot_dead_letter(
    settings: Settings,
    serde: Serde,
    clickstream: list[dict[str, Any]],  # noqa: F811 - the fixture
    tmp_path: Path,
    kind: str,
) -> None:
    """A schema folder without the dead-letter schema: a bad record cannot be dead-lettered. The
    processor skips it with one ERROR line naming topic, partition and offset, counts it, goes on
    with the valid records, and a restart neither meets it again nor fails."""
    s = engine(settings, kind, kind)
    schemas = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, schemas)
    for path in schemas.glob("dead_letter.*.avsc"):
        path.unlink()
    s = s.model_copy(update={"schemas_dir": schemas})
    clicks = clickstream[4000:4300]
    publish(s, serde, clicks)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(s.model_dump(mode="json", exclude_none=True)))
    name = "features-user_activity"

    first = run_cli(config, name, "--until-caught-up")
    assert first.returncode == 0, first.stderr
    garbage = TopicCatalog(s).name("clicks")
    skipped = [line for line in first.stderr.splitlines() if "cannot dead-letter" in line]
    assert len(skipped) == 1, first.stderr
    assert re.search(rf"ERROR .*cannot dead-letter {re.escape(garbage)} \[1\] @\d+ .*skipped", skipped[0])
    assert f"{name}: {len(clicks)} events processed" in first.stdout
    assert statuses(s)[name]["dead_letters_lost"] == 1
    assert len({u["entity_key"] for u in read_all(s, serde, "feature-updates")}) == len(
        {c["user_id"] for c in clicks}
    )

    again = run_cli(config, name, "--until-caught-up")
    assert again.returncode == 0, again.stderr
    assert "cannot dead-letter" not in again.stderr
    assert f"{name}: 0 events processed" in again.stdout
