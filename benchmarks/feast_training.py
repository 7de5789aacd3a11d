"""Feast's side of the training-set benchmark; runs in Feast's own virtualenv (.venv-feast).

Usage: feast_training.py WORKDIR FEATURES.parquet LABELS.parquet N_FEATURES REPEAT
Registers one feature view over the feature rows (Feast's local provider, file offline store),
runs ``get_historical_features(...).to_df()`` REPEAT times, writes the last result to
WORKDIR/feast_result.parquet and prints one JSON line: {"times_s": [...], "cpu_s": [...], "rows": n,
"version": v} (wall and CPU seconds of each run).
Timestamps are epoch ms in the files, converted here as a Feast user would.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pandas as pd


def main() -> None:
    workdir, features_path, labels_path = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    n_features, repeat = int(sys.argv[4]), int(sys.argv[5])
    warnings.filterwarnings("ignore")
    import feast
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig
    from feast.types import Float64

    rows = pd.read_parquet(features_path)
    rows["event_timestamp"] = pd.to_datetime(rows.pop("event_time"), unit="ms", utc=True)
    rows["created"] = pd.to_datetime(rows.pop("write_time"), unit="ms", utc=True)
    source_path = workdir / "feast_features.parquet"
    rows.to_parquet(source_path)
    del rows
    labels = pd.read_parquet(labels_path)
    labels["event_timestamp"] = pd.to_datetime(labels["label_time"], unit="ms", utc=True)

    names = [f"f{i:02d}" for i in range(n_features)]
    entity = Entity(name="entity", join_keys=["entity_key"])
    view = FeatureView(
        name="bench",
        entities=[entity],
        ttl=timedelta(days=3650),
        schema=[Field(name=n, dtype=Float64) for n in names],
        source=FileSource(
            path=str(source_path), timestamp_field="event_timestamp", created_timestamp_column="created"
        ),
    )
    config = RepoConfig(
        project="bench",
        registry=str(workdir / "registry.db"),
        provider="local",
        entity_key_serialization_version=3,
    )
    store = FeatureStore(config=config)
    store.apply([entity, view])
    refs = [f"bench:{n}" for n in names]
    times, cpu, result = [], [], pd.DataFrame()
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = store.get_historical_features(entity_df=labels, features=refs).to_df()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    result.to_parquet(workdir / "feast_result.parquet")
    print(json.dumps({"times_s": times, "cpu_s": cpu, "rows": len(result), "version": feast.__version__}))


if __name__ == "__main__":
    main()
