"""A broker restart loses nothing that matters: compacted topics come back from the lake."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from headwater.settings import Settings, load_settings
from infra.restore import COMPACTED_TOPICS
from infra.stack import start_stack, stop_stack
from processors.lake import LakeReader
from processors.worker import run_processors
from streams.producer import EventProducer
from streams.serde import Serde
from streams.state import CompactedState


def model_event(name: str, version: int, alias: str | None = None) -> dict[str, Any]:
    return {
        "event_id": f"{name}-{version}-{alias}", "event_time": 1_700_000_000_000 + version,
        "model_name": name, "kind": "ALIAS_MOVED" if alias else "VERSION_REGISTERED", "version": version,
        "alias": alias, "previous_version": None, "artifact_uri": None, "artifact_sha256": None,
        "feature_refs": [], "metrics": {"auc": 0.5 + version / 100}, "metadata": {}, "actor": "test",
        "reason": None, "forced": False,
    }  # fmt: skip


def experiment(exp: str, status: str) -> dict[str, Any]:
    variants = [{"name": "a", "model_ref": "ctr@production", "weight": 0.5}]
    return {
        "event_id": f"{exp}-{status}", "event_time": 1, "experiment_id": exp, "status": status,
        "policy": "AB", "variants": variants, "params": {}, "owner": "t", "description": "", "actor": "t",
    }  # fmt: skip


def bandit(exp: str, pulls: int) -> dict[str, Any]:
    arms = [{"variant": "a", "pulls": pulls, "reward_sum": 1.0, "reward_sq_sum": 1.0}]
    return {
        "event_id": f"{exp}-{pulls}",
        "event_time": pulls,
        "experiment_id": exp,
        "arms": arms,
        "last_offset": {},
    }


def update(entity: str, t: int) -> dict[str, Any]:
    # Every type a value can have: the restore must bring each back as written (a long is not a
    # double, a boolean not a number, a null key stays a key).
    values = {"clicks_7d": t, "ctr_7d": t / 7, "clicked": t % 2 == 0, "last_item": f"i{t}", "best": None}
    return {
        "event_id": f"{entity}-{t}", "feature_set": "user_activity", "feature_set_version": 1,
        "entity_key": entity, "event_time": t, "write_time": t, "values": values, "source": "STREAM",
    }  # fmt: skip


def snapshot(settings: Settings, serde: Serde) -> dict[str, dict[str, dict[str, Any]]]:
    out = {}
    for topic in COMPACTED_TOPICS:
        with CompactedState(settings, serde, topic) as state:
            out[topic] = state.wait_until_caught_up().snapshot()
    return out


def typed(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def lake_rows(settings: Settings, serde: Serde) -> dict[str, int]:
    reader = LakeReader(settings, serde.catalog)
    counts = {}
    for topic in COMPACTED_TOPICS:
        table = reader.read_topic(topic)
        counts[topic] = len(table)
        places = set(zip(table["_partition"].to_pylist(), table["_offset"].to_pylist(), strict=True))
        assert len(places) == len(table), f"{topic}: a (partition, offset) is archived twice"
    return counts


def test_broker_restart_restores_every_compacted_topic(tmp_path: Path, serde: Serde) -> None:
    settings = load_settings(data_dir=tmp_path / "stack")
    start_stack(settings, processors=False, serving=False)  # its own broker: this test stops and restarts it
    try:
        with EventProducer(settings, serde) as producer:
            for version in (1, 2, 3):
                producer.send("models", model_event("ctr", version))
            producer.send("models", model_event("ctr", 2, alias="production"))
            producer.send("models", model_event("ctr", 3, alias="production"))  # the alias moved on
            for status in ("DRAFT", "RUNNING", "STOPPED"):
                producer.send("experiments", experiment("exp-1", status))
            for pulls in (1, 5, 9):
                producer.send("bandit-state", bandit("exp-1", pulls))
            for t in (10, 20, 30):
                producer.send("feature-updates", update("u1", t))
                producer.send("feature-updates", update("u2", t + 1))
            producer.flush()
        before = snapshot(settings, serde)
        assert before["models"]["ctr@production"]["version"] == 3
        assert before["feature-updates"]["user_activity|u1"]["values"] == update("u1", 30)["values"]
        run_processors(settings, ["lake-sink"], threading.Event(), until_caught_up=True)
        archived = lake_rows(settings, serde)
        assert archived == {"models": 5, "experiments": 3, "bandit-state": 3, "feature-updates": 6}

        stop_stack(settings)  # the memory-only broker forgets everything
        stack = start_stack(settings, processors=False, serving=False)
        assert stack.started
        assert stack.restored == {"models": 4, "experiments": 1, "bandit-state": 1, "feature-updates": 2}
        # Compared as JSON: 1, 1.0 and True are equal in Python, not in JSON.
        assert typed(snapshot(settings, serde)) == typed(before)

        # The lake sink runs again over the restored copies: nothing is archived twice.
        run_processors(settings, ["lake-sink"], threading.Event(), until_caught_up=True)
        assert lake_rows(settings, serde) == archived
    finally:
        stop_stack(settings)
