"""Feast's side of the backfill benchmark; runs inside Feast's own virtualenv (.venv-feast).

Usage: feast_backfill.py WORKDIR

Driven by ``benchmarks/features_backfill.py``, which writes ``WORKDIR/features.parquet`` (the
rows the Headwater backfill computed: ``entity_key``, ``event_timestamp`` and one column per
feature, one row per entity and event time) and ``WORKDIR/spec.json`` (feature types, the
materialization range, probe entities). This script registers one feature view over the file
(local provider: file offline store, SQLite online store), times
``FeatureStore.materialize(start, end)`` -- which picks each entity's latest row in the range
and writes it to the online store -- and prints one JSON line:
``{"version", "materialize_s", "cpu_s", "probe": {entity: {feature: value}}}``.
It imports nothing from Headwater.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


def main(workdir: Path) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    import feast
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource
    from feast.types import Float64, Int64, String

    spec = json.loads((workdir / "spec.json").read_text())
    types = {"long": Int64, "double": Float64, "string": String, "boolean": Int64}
    repo = workdir / "feast_repo"
    repo.mkdir(exist_ok=True)
    (repo / "feature_store.yaml").write_text(
        "project: headwater_backfill_bench\n"
        f"registry: {repo / 'registry.db'}\n"
        "provider: local\n"
        "online_store:\n"
        "  type: sqlite\n"
        f"  path: {repo / 'online.db'}\n"
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
    )
    entity = Entity(name="entity", join_keys=["entity_key"])
    view = FeatureView(
        name=spec["feature_set"],
        entities=[entity],
        ttl=timedelta(days=3650),
        schema=[Field(name=name, dtype=types[dtype]) for name, dtype in spec["features"].items()],
        source=FileSource(path=str(workdir / "features.parquet"), timestamp_field="event_timestamp"),
        online=True,
    )
    store = FeatureStore(repo_path=str(repo))
    store.apply([entity, view])
    start = datetime.fromtimestamp(spec["start_ms"] / 1000, tz=UTC)
    end = datetime.fromtimestamp(spec["end_ms"] / 1000, tz=UTC)
    started, started_cpu = time.perf_counter(), time.process_time()
    store.materialize(start, end, feature_views=[spec["feature_set"]])
    materialize_s, cpu_s = time.perf_counter() - started, time.process_time() - started_cpu

    refs = [f"{spec['feature_set']}:{name}" for name in spec["features"]]
    probe = store.get_online_features(
        features=refs, entity_rows=[{"entity_key": key} for key in spec["probe"]]
    ).to_dict()
    return {
        "version": feast.__version__,
        "materialize_s": materialize_s,
        "cpu_s": cpu_s,
        "probe": {key: {f: probe[f][i] for f in spec["features"]} for i, key in enumerate(spec["probe"])},
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
