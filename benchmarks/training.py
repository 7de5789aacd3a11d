"""The daily training pipeline at scale: 1M labelled rows, 50 features, stage by stage.

    .venv/bin/python benchmarks/training.py                   # 1M labels, 50 features (a few minutes)
    .venv/bin/python benchmarks/training.py --rows 50000 --users 2000 --items 20   # a quick check

Stages, each the library call the Dagster asset makes (:mod:`batch.assets`):

1. **labels** -- :func:`models.training.build_labels` over the lake's ``clicks`` (ClickHouse);
2. **training set** -- :func:`models.training.training_frame`: the labels joined point-in-time
   (bitemporal) to the 50 stored features (the build rate in rows/s is reported);
3. **training** -- :func:`models.training.train` (time split, fit, holdout metrics, feature
   statistics, deterministic skops artifact);
4. **evaluation** -- the candidate and an incumbent loaded from their artifacts and scored on
   the same holdout (the incumbent is the candidate's own artifact: the same work as a real one);
5. **registration** -- artifact and holdout into the artifact store, ``register``, staging,
   production (the first version: no gate to score) on the embedded broker's ``models`` topic;
6. **batch inference** -- the last day's users x items with their features as of the day's
   end, scored and ranked (top 10 per user), written to the online store and the warehouse.

Data (synthetic, written to a lake in a temporary directory, not timed): ``--rows``
impressions over ``--days`` days from ``--users`` users on ``--items`` items, a click
probability driven by a per-user latent value; one feature set ``bench`` (entity
``user_id``) whose 50 features are noisy views of that latent, updated ``--feature-rows``
times in all (streamed: write time 0-60 s after event time). The first 10,000 rows of each
topic go through ``LakeWriter`` (the sink's path), the rest are built column-wise with the
same schema, as ``benchmarks/features_training.py`` does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# The project before benchmarks/ (Python puts a script's folder first), whose serving.py would
# hide the serving package; benchmarks/ last, for the sibling scripts imported below.
_BENCH = ROOT / "benchmarks"
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() not in (ROOT, _BENCH))]
sys.path.append(str(ROOT / "benchmarks"))

from features_training import FEATURE_SET, _records, bulk_table, enumerate_rows  # noqa: E402

from batch.assets.predictions import (  # noqa: E402
    entity_frame,
    score_entities,
    write_predictions_online,
)
from batch.assets.registration import registration_metadata  # noqa: E402
from batch.offline_store import open_offline_store  # noqa: E402
from features.definitions import FeatureSet, Last  # noqa: E402
from features.repository import FeatureRepository  # noqa: E402
from headwater.sdk import FeatureStore  # noqa: E402
from headwater.settings import Settings, load_settings  # noqa: E402
from models.artifact import load_pipeline  # noqa: E402
from models.spec import ModelSpec, PostSpec  # noqa: E402
from models.training import build_labels, train, training_frame  # noqa: E402
from processors.lake import LakeWriter  # noqa: E402
from processors.lake.layout import date_of  # noqa: E402
from registry import Registry, open_artifact_store  # noqa: E402
from streams.catalog import SchemaCatalog  # noqa: E402

DAY_MS = 86_400_000
T_END = 1_700_006_400_000  # a UTC midnight
FIRST_BATCH = 10_000  # rows written through LakeWriter itself
STAGES = ("labels", "training_set", "training", "evaluation", "registration", "batch_inference")


def repository(n_features: int) -> FeatureRepository:
    bench = FeatureSet(
        FEATURE_SET,
        entity="user_id",
        source="clicks",
        features=[Last("propensity", windows=["7d"], name=f"f{i:02d}") for i in range(n_features)],
        owner="bench@headwater.dev",
        description="Synthetic: noisy views of a per-user latent value.",
    )
    return FeatureRepository([bench])


def spec_of(repo: FeatureRepository, max_iter: int) -> ModelSpec:
    refs = tuple(f"{FEATURE_SET}:{n}" for n in repo.feature_set(FEATURE_SET).feature_names)
    return ModelSpec(
        name="bench_ctr", entity_keys=("user_id", "item_id"), features=refs, request_features=("position",),
        label="clicked", task="classification", estimator="hist_gradient_boosting",
        params={"max_iter": max_iter, "learning_rate": 0.1, "max_depth": 4, "min_samples_leaf": 100},
        metric="roc_auc", defaults={"position": 2}, post=PostSpec(kind="rank", rank_key="item_id", top_k=10),
        owner="bench@headwater.dev",
    )  # fmt: skip


# --- data -------------------------------------------------------------------------------------


def _write_bulk(lake: Path, topic: str, table: pa.Table) -> None:
    """Rows as the sink would cut them: one file per date folder, lake offsets in order."""
    dates = pa.array([date_of(int(t)) for t in table.column("event_time").to_numpy()])
    for date in pc.unique(dates).to_pylist():
        part = table.filter(pc.equal(dates, date))
        offsets = part.column("_offset")
        first, last = pc.min(offsets).as_py(), pc.max(offsets).as_py()
        folder = lake / topic / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, folder / f"{topic}+0+{first}-{last}.parquet")


def write_clicks(settings: Settings, args: argparse.Namespace, latent: np.ndarray) -> tuple[int, int]:
    rng = np.random.default_rng(args.seed)
    n, start = args.rows, T_END - args.days * DAY_MS
    users = rng.integers(0, args.users, n)
    items = rng.integers(0, args.items, n)
    item_effect = rng.normal(0, 0.5, args.items)
    times = np.sort(rng.integers(start, T_END, n))
    p = 1 / (1 + np.exp(-(-3.6 + 1.2 * latent[users] + item_effect[items])))
    clicked = rng.random(n) < p
    impressions = pd.DataFrame(
        {
            "event_id": [f"i{i}" for i in range(n)],
            "event_time": times,
            "user_id": pd.Series(users).map("u{}".format),
            "item_id": pd.Series(items).map("{}".format),
            "action": "IMPRESSION",
            "position": rng.integers(1, 4, n).astype(np.int32),
        }
    )
    clicks = impressions[clicked].assign(action="CLICK", event_id=lambda f: "c" + f["event_id"].str[1:])
    events = pd.concat([impressions, clicks]).sort_values(["event_time", "action"], kind="stable")
    events = events.assign(campaign="all", propensity=1 / args.items, session_id=None).reset_index(drop=True)
    records = [{**r, "user_features": {}} for r in events.head(FIRST_BATCH).to_dict("records")]
    for r in records:
        r["session_id"] = None
    writer = LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir))
    (real,) = {p for p in writer.write("clicks", [(0, i, r) for i, r in enumerate(records)])[:1]}
    schema = pq.read_schema(real).remove_metadata()
    rest = events.iloc[FIRST_BATCH:]
    m = len(rest)
    offsets = np.arange(FIRST_BATCH, FIRST_BATCH + m, dtype=np.int64)
    empty_map = pa.MapArray.from_arrays(
        pa.array(np.zeros(m + 1, np.int32)), pa.array([], pa.string()), pa.array([], pa.string())
    )
    columns: dict[str, Any] = {c: pa.array(rest[c].to_numpy()) for c in ("event_id", "user_id", "item_id")}
    columns.update(
        event_time=pa.array(rest["event_time"].to_numpy(), pa.int64()),
        action=pa.array(rest["action"].to_numpy(), pa.string()),
        position=pa.array(rest["position"].to_numpy(), pa.int32()),
        campaign=pa.array(["all"] * m, pa.string()),
        propensity=pa.array(np.full(m, 1 / args.items)),
        session_id=pa.nulls(m, pa.string()),
        user_features=empty_map.cast(schema.field("user_features").type),
        _topic=pa.array(["clicks"] * m, pa.string()),
        _partition=pa.array(np.zeros(m, np.int32)),
        _offset=pa.array(offsets),
        _key=pa.array(rest["user_id"].to_numpy(), pa.string()),
        _event_type=pa.array(["click"] * m, pa.string()),
        _ingest_time=pa.array(np.full(m, int(time.time() * 1000), np.int64)),
    )
    _write_bulk(settings.lake_dir, "clicks", pa.Table.from_pydict(columns, schema=schema))
    return n, int(clicked.sum())


def write_features(
    settings: Settings, args: argparse.Namespace, latent: np.ndarray, names: list[str]
) -> None:
    rng = np.random.default_rng(args.seed + 1)
    n, start = args.feature_rows, T_END - (args.days + 7) * DAY_MS
    entity = rng.integers(0, args.users, n)
    event = rng.integers(start, T_END, n)
    weights = rng.uniform(-1, 1, len(names))
    values = latent[entity][:, None] * weights[None, :] + rng.normal(0, 1, (n, len(names)))
    frame = pd.DataFrame(values, columns=names).assign(
        entity_key=pd.Series(entity).map("u{}".format), event_time=event,
        write_time=event + rng.integers(0, 60_000, n),
    ).sort_values("write_time", kind="stable", ignore_index=True)  # fmt: skip
    writer = LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir))
    first = frame.head(FIRST_BATCH)
    (real,) = {p for p in writer.write("feature-updates", enumerate_rows(_records(first, names)))[:1]}
    schema = pq.read_schema(real).remove_metadata()
    for offset in range(FIRST_BATCH, n, 200_000):
        part = frame.iloc[offset : offset + 200_000]
        _write_bulk(settings.lake_dir, "feature-updates", bulk_table(part, offset, names, schema))


# --- the pipeline ------------------------------------------------------------------------------


def run_pipeline(settings: Settings, args: argparse.Namespace, repo: FeatureRepository) -> dict[str, Any]:
    spec = spec_of(repo, args.max_iter)
    start, last_day = T_END - args.days * DAY_MS, T_END - DAY_MS
    r: dict[str, Any] = {}

    t = time.perf_counter()
    with open_offline_store(settings) as store:
        labels = build_labels(store, start, T_END)
    r["labels_s"], r["labels"] = time.perf_counter() - t, len(labels)
    r["positives"] = int(labels["clicked"].sum())

    t = time.perf_counter()
    with FeatureStore(settings, repo) as features:
        frame = training_frame(features, spec, labels, bitemporal=True)
    r["training_set_s"] = time.perf_counter() - t
    r["training_set_rows_per_s"] = len(frame) / r["training_set_s"]
    r["missing_share"] = float(frame[list(spec.features)].isna().to_numpy().mean())

    t = time.perf_counter()
    trained = train(spec, repo, frame, holdout_share=0.2)
    r["training_s"], r["metrics"], r["sha256"] = time.perf_counter() - t, trained.metrics, trained.sha256

    t = time.perf_counter()
    candidate = load_pipeline(trained.artifact, repo)
    incumbent = load_pipeline(trained.artifact, repo)
    r["candidate_auc"] = candidate.evaluate(trained.holdout)["roc_auc"]
    r["incumbent_auc"] = incumbent.evaluate(trained.holdout)["roc_auc"]
    r["evaluation_s"], r["holdout_rows"] = time.perf_counter() - t, len(trained.holdout)

    t = time.perf_counter()
    artifacts = open_artifact_store(settings)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(trained.holdout, preserve_index=False), sink)
    holdout_uri, holdout_sha = artifacts.put(sink.getvalue().to_pybytes(), suffix=".parquet")
    summary = {
        "params": trained.params, "package_versions": trained.package_versions,
        "code_version": trained.code_version, "feature_stats": trained.feature_stats,
        "holdout_uri": holdout_uri, "holdout_sha256": holdout_sha, "window": "bench",
        "training_data": {"query": "benchmark", "start_ms": start, "end_ms": T_END, "rows": trained.rows,
                          "data_hash": trained.data_hash},
    }  # fmt: skip
    with Registry(settings, actor="bench") as registry:
        mv = registry.register(
            spec.name, trained.artifact, feature_refs=list(spec.features), metrics=trained.metrics,
            metadata=registration_metadata(spec, summary),
        )  # fmt: skip
        registry.promote(spec.name, mv.version, "staging", force=True, reason="benchmark candidate")
        registry.promote(spec.name, mv.version, "production")
    r["registration_s"] = time.perf_counter() - t

    t = time.perf_counter()
    with open_offline_store(settings) as store:
        day = store.query_df(
            "SELECT DISTINCT user_id, item_id FROM clicks "
            "WHERE event_time >= {a:Int64} AND event_time < {b:Int64}",
            {"a": last_day, "b": T_END},
        )
    entities = {"user_id": sorted(day["user_id"].unique()), "item_id": sorted(day["item_id"].unique())}
    pairs = entity_frame(
        settings, spec, pipeline=candidate, repository=repo, entities=entities, as_of_ms=T_END - 1
    )
    t_score = time.perf_counter()
    scored = score_entities(spec, candidate, pairs)
    r["scoring_s"] = time.perf_counter() - t_score
    write_predictions_online(settings, spec.name, scored, key="user_id", event_ms=T_END, version=mv.version)
    pq.write_table(
        pa.Table.from_pandas(scored, preserve_index=False), settings.data_dir / "predictions.parquet"
    )
    r["batch_inference_s"], r["scored_pairs"], r["scored_users"] = (
        time.perf_counter() - t,
        len(pairs),
        len(scored),
    )
    r["total_s"] = sum(r[f"{stage}_s"] for stage in STAGES)
    return r


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nDaily pipeline: {r['labels']:,} labelled rows ({r['positives']:,} positives) x "
        f"{args.features} features, {args.users:,} users, {args.items} items, "
        f"{args.feature_rows:,} feature rows, {args.days} days"
    )
    stages = [
        ("labels", "labels_s", f"{r['labels']:,} impressions labelled"),
        ("training set (point-in-time)", "training_set_s",
         f"{r['training_set_rows_per_s']:,.0f} rows/s; missing share {r['missing_share']:.1%}"),
        ("training", "training_s", f"holdout AUC {r['metrics'].get('roc_auc', float('nan')):.3f}"),
        ("evaluation (2 versions)", "evaluation_s", f"{r['holdout_rows']:,} holdout rows each"),
        ("registration", "registration_s", "register + staging + production, models topic"),
        ("batch inference", "batch_inference_s",
         f"{r['scored_pairs']:,} pairs -> {r['scored_users']:,} users, scoring {r['scoring_s']:.1f}s"),
    ]  # fmt: skip
    for name, key, note in stages:
        print(f"  {name:<30} {r[key]:8.2f} s   {note}")
    print(f"  {'total':<30} {r['total_s']:8.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="labelled rows (impressions)")
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--feature-rows", type=int, default=None, help="feature updates (default: --rows)")
    parser.add_argument("--max-iter", type=int, default=100, help="boosting iterations")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    args.feature_rows = args.feature_rows or args.rows

    from streams.broker import EmbeddedBroker
    from streams.topics import TopicCatalog

    tmp = Path(tempfile.mkdtemp(prefix="headwater-bench-training-"))
    broker = None
    try:
        settings = load_settings(data_dir=tmp)
        broker = EmbeddedBroker(settings)
        info = broker.start()
        settings = load_settings(data_dir=tmp, bootstrap_servers=info.bootstrap)
        from confluent_kafka.admin import AdminClient

        TopicCatalog(settings).create_all(AdminClient({"bootstrap.servers": info.bootstrap}))
        repo = repository(args.features)
        names = repo.feature_set(FEATURE_SET).feature_names
        latent = np.random.default_rng(args.seed + 2).normal(0, 1, args.users)
        t = time.perf_counter()
        write_clicks(settings, args, latent)
        write_features(settings, args, latent, names)
        print(f"data written in {time.perf_counter() - t:.1f}s to {tmp}")
        result = run_pipeline(settings, args, repo)
        report(result, args)
        if args.json:
            print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, default=str))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
