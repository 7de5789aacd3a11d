"""Feast's side of the online-read benchmark; runs inside Feast's own virtualenv.

Driven by ``benchmarks/features_online.py``, which writes the data and the lookups to a
directory and runs ``.venv-feast/bin/python benchmarks/feast_online.py DIR``. This script
builds a Feast repository there with the local provider and the SQLite online store, writes
the same rows to the online store (``write_to_online_store``), then times
``FeatureStore.get_online_features(...).to_dict()`` on the same lookups and prints one JSON
object on stdout. It imports nothing from Headwater.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, __version__
from feast.types import Float64, Int64, String

FEATURE_VIEW = "user_features"


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {
        "p50_ms": ordered[len(ordered) // 2] / 1e6,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6,
        "n": len(ordered),
    }


def main(workdir: Path) -> dict[str, Any]:
    spec = json.loads((workdir / "lookups.json").read_text())
    features: list[str] = spec["features"]
    repo = workdir / "feast_repo"
    repo.mkdir(exist_ok=True)
    (repo / "feature_store.yaml").write_text(
        "project: headwater_bench\n"
        f"registry: {repo / 'registry.db'}\n"
        "provider: local\n"
        "online_store:\n"
        "  type: sqlite\n"
        f"  path: {repo / 'online.db'}\n"
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
    )
    df = pd.read_parquet(workdir / "rows.parquet")
    dtypes = {name: (Int64 if str(df[name].dtype).startswith("int") else Float64) for name in features}
    user = Entity(name="user", join_keys=["user_id"])
    view = FeatureView(
        name=FEATURE_VIEW,
        entities=[user],
        ttl=timedelta(days=3650),
        schema=[Field(name="user_id", dtype=String)] + [Field(name=f, dtype=dtypes[f]) for f in features],
        source=FileSource(path=str(workdir / "rows.parquet"), timestamp_field="event_timestamp"),
        online=True,
    )
    store = FeatureStore(repo_path=str(repo))
    store.apply([user, view])
    started = time.perf_counter()
    store.write_to_online_store(FEATURE_VIEW, df)
    load_s = time.perf_counter() - started

    refs = [f"{FEATURE_VIEW}:{f}" for f in features]

    def read(keys: list[str]) -> dict[str, list[Any]]:
        result: dict[str, list[Any]] = store.get_online_features(
            features=refs, entity_rows=[{"user_id": k} for k in keys]
        ).to_dict()
        return result

    out: dict[str, Any] = {"feast_version": __version__, "load_s": load_s, "cases": {}}
    for case, lookups in spec["cases"].items():
        for keys in lookups[: spec["warmup"]]:
            read(keys)
        samples = []
        for keys in lookups:
            t = time.perf_counter_ns()
            read(keys)
            samples.append(time.perf_counter_ns() - t)
        out["cases"][case] = _percentiles(samples)
    # Values of a few entities, so the driver can check both sides served the same data.
    probe = read(spec["probe"])
    out["probe"] = {key: {f: probe[f][i] for f in features} for i, key in enumerate(spec["probe"])}
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
