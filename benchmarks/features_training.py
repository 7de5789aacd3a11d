"""Training sets: point-in-time joins, Headwater (chdb over the Parquet lake) against Feast, same run.

    .venv/bin/python benchmarks/features_training.py            # 100k labels x 1M rows, vs Feast
    .venv/bin/python benchmarks/features_training.py --big      # also 1M labels x 10M rows, Headwater

Data: one feature set of 50 float features over ``--entities`` entities; feature rows have
event times spread over 30 days and write times 0-60 s later (a streaming pipeline's delay),
and reach the lake in write-time order, as from the sink; ``--duplicates`` (1 %) of them are
copies of an update written again up to 2 minutes later, as a processor's replay after a crash
leaves them (Headwater reads each update once; Feast keeps the copy, whose values are the
same). Labels pick a random entity and time in the same 30 days. Both systems read the same rows.

Headwater's lake: the first batch goes through ``LakeWriter`` (the sink's real path); the
rest is built column-wise with the same schema (checked), because writing 10M rows record by
record would take minutes, and retrieval does not care how a file was written. Files are cut
like a sink flushing every ``--batch-rows`` offsets, one per date folder.

Feast runs in its own virtualenv (``benchmarks/feast_env.sh``) as a subprocess that prints
JSON; both sides are timed around ``get_historical_features`` to a DataFrame, labels given as
a DataFrame. Headwater's default is bitemporal; Feast's semantics (event time only, ties by
created time) are Headwater's ``bitemporal=False``, whose values are compared with Feast's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
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
sys.path.insert(0, str(ROOT))

from batch.offline_store import get_historical_features, open_offline_store  # noqa: E402
from headwater.settings import Settings, load_settings  # noqa: E402
from processors.lake import LakeWriter  # noqa: E402
from processors.lake.layout import date_of  # noqa: E402
from streams.catalog import SchemaCatalog  # noqa: E402

T0 = 1_700_000_000_000
SPAN_MS = 30 * 86_400_000
FEATURE_SET = "bench"
FIRST_BATCH = 10_000  # rows written through LakeWriter itself


def feature_rows(
    n: int, entities: int, n_features: int, seed: int, *, span: tuple[int, int], duplicates: float = 0.0
) -> pd.DataFrame:
    """``n`` updates with event times in ``[start, end)``, in arrival (write-time) order.

    A ``duplicates`` share of them are copies of others (same event id and values, written up
    to 2 minutes later), as a processor's replay after a crash leaves in the lake.
    """
    rng = np.random.default_rng(seed)
    start, end = span
    copies = int(n * duplicates)
    base = n - copies
    event = rng.integers(start, max(end, start + 1), base)
    data: dict[str, Any] = {
        "event_id": [f"{FEATURE_SET}|{seed}|{i}" for i in range(base)],
        "entity_key": pd.Series(rng.integers(0, entities, base)).map("u{}".format),
        "event_time": event,
        "write_time": event + rng.integers(0, 60_000, base),
    }
    values = rng.random((base, n_features))
    data.update({f"f{i:02d}": values[:, i] for i in range(n_features)})
    frame = pd.DataFrame(data)
    if copies:
        again = frame.iloc[rng.integers(0, base, copies)].copy()
        again["write_time"] += rng.integers(1, 120_000, copies)
        frame = pd.concat([frame, again], ignore_index=True)
    return frame.sort_values("write_time", kind="stable", ignore_index=True)


def labels_frame(n: int, entities: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "entity_key": pd.Series(rng.integers(0, entities, n)).map("u{}".format),
            "label_time": T0 + rng.integers(0, SPAN_MS, n),
            "label": rng.integers(0, 2, n),
        }
    )


def _records(frame: pd.DataFrame, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for row in frame.itertuples(index=False):
        out.append(
            {
                "event_id": row.event_id,
                "feature_set": FEATURE_SET,
                "feature_set_version": 1,
                "entity_key": row.entity_key,
                "event_time": int(row.event_time),  # type: ignore[arg-type]
                "write_time": int(row.write_time),  # type: ignore[arg-type]
                "values": {n: float(getattr(row, n)) for n in names},
                "source": "STREAM",
            }
        )
    return out


def bulk_table(frame: pd.DataFrame, first_offset: int, names: list[str], schema: pa.Schema) -> pa.Table:
    """The table LakeWriter would write for these rows, built column-wise."""
    n = len(frame)
    ent = pa.array(frame["entity_key"], pa.string())
    offsets = np.arange(first_offset, first_offset + n, dtype=np.int64)
    values = {name: pa.array(frame[name].to_numpy(), pa.float64()) for name in names}
    no_exceptions = pa.MapArray.from_arrays(
        pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()), pa.array([], pa.string())
    )
    columns: dict[str, Any] = {
        "event_id": pa.array(frame["event_id"], pa.string()),
        "feature_set": pa.array([FEATURE_SET] * n, pa.string()),
        "feature_set_version": pa.array(np.ones(n, np.int32)),
        "entity_key": ent,
        "event_time": pa.array(frame["event_time"].to_numpy(), pa.int64()),
        "write_time": pa.array(frame["write_time"].to_numpy(), pa.int64()),
        "value_keys": pa.array([json.dumps(names, separators=(",", ":"))] * n, pa.string()),
        "value_exceptions": no_exceptions.cast(schema.field("value_exceptions").type),
        "source": pa.array(["STREAM"] * n, pa.string()),
        "_topic": pa.array(["feature-updates"] * n, pa.string()),
        "_partition": pa.array(np.zeros(n, np.int32)),
        "_offset": pa.array(offsets),
        "_key": pc.binary_join_element_wise(f"{FEATURE_SET}|", ent, ""),
        "_event_type": pa.array(["feature_update"] * n, pa.string()),
        "_ingest_time": pa.array(np.full(n, int(time.time() * 1000), np.int64)),
    }
    columns.update({f"{FEATURE_SET}:{name}": values[name] for name in names})
    return pa.Table.from_pydict(columns, schema=schema)


def build_lake(
    settings: Settings,
    rows: int,
    entities: int,
    n_features: int,
    *,
    batch_rows: int,
    seed: int,
    duplicates: float = 0.0,
) -> int:
    """Writes the lake; returns how many files it holds. Also saves the rows for Feast."""
    names = [f"f{i:02d}" for i in range(n_features)]
    writer = LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir))

    def slice_of(offset: int, n: int) -> tuple[int, int]:
        # The stream arrives in time order: each flush covers the next slice of the 30 days.
        return T0 + SPAN_MS * offset // rows, T0 + SPAN_MS * (offset + n) // rows

    first = feature_rows(
        FIRST_BATCH, entities, n_features, seed, span=slice_of(0, FIRST_BATCH), duplicates=duplicates
    )
    (real,) = {p for p in writer.write("feature-updates", list(enumerate_rows(_records(first, names))))[:1]}
    schema = pq.read_schema(real).remove_metadata()
    check = bulk_table(first, 0, names, schema)
    assert check.schema.equals(schema), "bulk tables must have LakeWriter's schema"
    topic_dir = settings.lake_dir / "feature-updates"
    offset, part = FIRST_BATCH, 1
    while offset < rows:
        n = min(batch_rows, rows - offset)
        frame = feature_rows(
            n, entities, n_features, seed + part, span=slice_of(offset, n), duplicates=duplicates
        )
        table = bulk_table(frame, offset, names, schema)
        dates = pa.array([date_of(int(t)) for t in frame["event_time"].to_numpy()])
        for date in pc.unique(dates).to_pylist():
            folder = topic_dir / f"date={date}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                table.filter(pc.equal(dates, date)),
                folder / f"feature-updates+0+{offset}-{offset + n - 1}.parquet",
                # As LakeWriter: floats plain and uncompressed, the rest with dictionaries and snappy.
                use_dictionary=[f.name for f in schema if not pa.types.is_floating(f.type)],
                compression={f.name: "none" if pa.types.is_floating(f.type) else "snappy" for f in schema},
            )
        offset, part = offset + n, part + 1
    return len(list(topic_dir.rglob("*.parquet")))


def enumerate_rows(records: list[dict[str, Any]]) -> list[tuple[int, int, dict[str, Any]]]:
    return [(0, i, r) for i, r in enumerate(records)]


def feast_rows(settings: Settings, out: Path) -> None:
    """The same feature rows as the lake, in Feast's shape: one column per feature."""
    table = pq.read_table(settings.lake_dir / "feature-updates")
    keep = ["entity_key", "event_time", "write_time"] + [
        c for c in table.column_names if c.startswith(f"{FEATURE_SET}:")
    ]
    table = table.select(keep).rename_columns([c.split(":", 1)[-1] for c in keep])
    pq.write_table(table, out)


def time_headwater(
    settings: Settings, labels: pd.DataFrame, refs: list[str], repeat: int, bitemporal: bool
) -> tuple[list[float], list[float], pd.DataFrame]:
    """Wall and CPU seconds (all threads of this process: chdb's included) of each run."""
    times, cpu, result = [], [], pd.DataFrame()
    with open_offline_store(settings) as store:
        for _ in range(repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = get_historical_features(store, labels, refs, bitemporal=bitemporal)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return times, cpu, result


def run_feast(
    workdir: Path, features: Path, labels: Path, n_features: int, repeat: int
) -> dict[str, Any] | None:
    env_script = ROOT / "benchmarks" / "feast_env.sh"
    made = subprocess.run(["bash", str(env_script)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        print(f"Feast unavailable (feast_env.sh failed): {made.stderr.strip()[-500:]}")
        return None
    python = ROOT / made.stdout.strip().splitlines()[-1] / "bin" / "python"
    proc = subprocess.run(
        [
            str(python),
            str(ROOT / "benchmarks" / "feast_training.py"),
            str(workdir),
            str(features),
            str(labels),
            str(n_features),
            str(repeat),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        print(f"Feast run failed:\n{proc.stderr[-2000:]}")
        return None
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def compare_with_feast(ours: pd.DataFrame, feast_result: pd.DataFrame, n_features: int) -> tuple[int, int]:
    """(rows compared, rows whose 50 values differ), joined on entity and label time."""
    theirs = feast_result.copy()
    theirs["label_time"] = (theirs["event_timestamp"].astype("int64") // 1_000_000).astype("int64")
    names = [f"f{i:02d}" for i in range(n_features)]
    mine = ours.rename(columns={f"{FEATURE_SET}:{n}": n for n in names})
    both = mine.merge(
        theirs[["entity_key", "label_time", *names]], on=["entity_key", "label_time"], suffixes=("", "_feast")
    )
    both = both.drop_duplicates(["entity_key", "label_time"])
    differ = np.zeros(len(both), dtype=bool)
    for n in names:
        a, b = both[n].to_numpy(dtype=float), both[f"{n}_feast"].to_numpy(dtype=float)
        differ |= ~((a == b) | (np.isnan(a) & np.isnan(b)))
    return len(both), int(differ.sum())


def scenario(
    args: argparse.Namespace, labels_n: int, rows: int, batch_rows: int, with_feast: bool
) -> dict[str, Any]:
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="headwater-bench-", dir=args.workdir))
    try:
        settings = load_settings(data_dir=workdir / "data")
        start = time.perf_counter()
        files = build_lake(
            settings,
            rows,
            args.entities,
            args.features,
            batch_rows=batch_rows,
            seed=args.seed,
            duplicates=args.duplicates,
        )
        labels = labels_frame(labels_n, args.entities, args.seed + 999)
        size = sum(p.stat().st_size for p in settings.lake_dir.rglob("*.parquet"))
        print(
            f"  lake: {rows:,} feature rows x {args.features} features in {files} files "
            f"({size / 2**30:.2f} GiB, {size / (rows * args.features):.1f} bytes per value), "
            f"built in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        refs = [f"{FEATURE_SET}:f{i:02d}" for i in range(args.features)]
        bt, bt_cpu, bt_result = time_headwater(settings, labels, refs, args.repeat, True)
        nb, nb_cpu, nb_result = time_headwater(settings, labels, refs, args.repeat, False)
        out: dict[str, Any] = {
            "labels": labels_n,
            "rows": rows,
            "files": files,
            "headwater_bitemporal_s": bt,
            "headwater_event_time_s": nb,
            "headwater_bitemporal_cpu_s": bt_cpu,
            "headwater_event_time_cpu_s": nb_cpu,
            "matched_bitemporal": int(bt_result[refs[0]].notna().sum()),
            "matched_event_time": int(nb_result[refs[0]].notna().sum()),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if with_feast:
            features_path, labels_path = workdir / "rows.parquet", workdir / "labels.parquet"
            feast_rows(settings, features_path)
            labels.to_parquet(labels_path)
            feast = run_feast(workdir, features_path, labels_path, args.features, args.repeat)
            if feast is not None:
                out["feast_s"], out["feast_cpu_s"] = feast["times_s"], feast["cpu_s"]
                out["feast_rows"], out["feast_version"] = feast["rows"], feast["version"]
                out["compared"], out["differ"] = compare_with_feast(
                    nb_result, pd.read_parquet(workdir / "feast_result.parquet"), args.features
                )
        return out
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def report(r: dict[str, Any]) -> None:
    def fmt(key: str) -> str:
        ts, cpu = r[key], r[key.replace("_s", "_cpu_s")]
        best = min(range(len(ts)), key=ts.__getitem__)
        return f"first {ts[0]:6.2f} s, best {ts[best]:6.2f} s wall ({cpu[best]:6.2f} s CPU)"

    bt, et = r["matched_bitemporal"], r["matched_event_time"]
    print(f"  Headwater bitemporal (default): {fmt('headwater_bitemporal_s')} {bt:,} labels matched")
    print(f"  Headwater event time only:      {fmt('headwater_event_time_s')} {et:,} labels matched")
    if "feast_s" in r:
        print(
            f"  Feast {r['feast_version']} (event time):  {fmt('feast_s')} {r['feast_rows']:,} rows returned"
        )
        for name, key in (("bitemporal", "headwater_bitemporal"), ("event time", "headwater_event_time")):
            print(
                f"  speed-up vs Feast ({name}): {min(r['feast_s']) / min(r[key + '_s']):5.1f}x best wall, "
                f"{r['feast_s'][0] / r[key + '_s'][0]:5.1f}x first wall, "
                f"{min(r['feast_cpu_s']) / min(r[key + '_cpu_s']):5.1f}x best CPU"
            )
        print(
            f"  same values as Feast (event-time mode): {r['compared'] - r['differ']:,}"
            f" of {r['compared']:,} rows compared"
        )
    print(f"  peak RSS of this process so far: {r['peak_rss_gib']:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--batch-rows", type=int, default=100_000, help="offsets per sink flush")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--duplicates", type=float, default=0.01, help="share of rows that are replayed copies of others"
    )
    parser.add_argument("--no-feast", action="store_true")
    parser.add_argument("--big", action="store_true", help="also 1M labels x 10M rows, Headwater alone")
    parser.add_argument("--big-labels", type=int, default=1_000_000)
    parser.add_argument("--big-rows", type=int, default=10_000_000)
    parser.add_argument("--workdir", default=None, help="where the lakes go (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated lakes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cores; {args.repeat} runs per system; first and best run shown",
        flush=True,
    )
    results = []
    print(f"\n{args.labels:,} labels x {args.rows:,} feature rows ({args.features} features):", flush=True)
    results.append(scenario(args, args.labels, args.rows, args.batch_rows, not args.no_feast))
    report(results[-1])
    if args.big:
        print(f"\n{args.big_labels:,} labels x {args.big_rows:,} feature rows (Headwater alone):", flush=True)
        args.repeat = min(args.repeat, 2)
        results.append(scenario(args, args.big_labels, args.big_rows, max(args.batch_rows, 1_000_000), False))
        report(results[-1])
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
