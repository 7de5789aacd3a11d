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

Window evaluation at label time is included: the feature set is windowed (ten numeric
aggregations over 5m, 1h, 6h, 24h and 7d: 50 features) and every row carries the tiles and
``valid_until`` the streaming engine computed for it, from the rows taken as click events in
event-time order. A label at or after its matched row's ``valid_until`` reads the windows
evaluated at the label time from those tiles (as an online read then would); the others read
the row's values, which stay random numbers, as in Feast. So Headwater's values equal Feast's
exactly for the labels not evaluated, and are checked for the evaluated ones against the
tiles' own evaluation. ``--no-tiles`` leaves the tiles out (the rows then hold forever).

Feast runs in its own virtualenv (``benchmarks/feast_env.sh``) as a subprocess that prints
JSON; both sides are timed around ``get_historical_features`` to a DataFrame, labels given as
a DataFrame. Headwater's default is bitemporal; Feast's semantics (event time only, ties by
created time) are Headwater's ``bitemporal=False``, whose values are compared with Feast's.
"""

from __future__ import annotations

import argparse
import itertools
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
sys.path.append(str(ROOT / "benchmarks"))  # after the packages: benchmarks/serving.py is no package

from windowed import windowed_features  # noqa: E402

from batch.offline_store import get_historical_features, open_offline_store  # noqa: E402
from features.engine import Aggregator, evaluate_tiles  # noqa: E402
from headwater.settings import Settings, load_settings  # noqa: E402
from processors.lake import LakeWriter  # noqa: E402
from processors.lake.layout import date_of  # noqa: E402
from streams.catalog import SchemaCatalog  # noqa: E402

T0 = 1_700_000_000_000
SPAN_MS = 30 * 86_400_000
FEATURE_SET = "bench"
FIRST_BATCH = 10_000  # rows written through LakeWriter itself
BENCH = windowed_features(FEATURE_SET)
NAMES = BENCH.feature_names  # the lake's features; Feast's columns f00..f49 are these, in order


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
    data.update({NAMES[i]: values[:, i] for i in range(n_features)})
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


def with_tiles(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with the tiles and valid_until the streaming engine computes for them, the rows
    taken as click events in event-time order (a copy of a row gets its original's)."""
    rng = np.random.default_rng(7)
    n = len(frame)
    items, positions = rng.integers(0, 500, n), rng.integers(1, 4, n)
    clicks, propensities = rng.random(n) < 0.05, rng.choice([0.0125, 0.025], n)
    aggregator = Aggregator(BENCH)
    tiles: dict[str, tuple[int, bytes]] = {}
    ids, keys, times = frame["event_id"].tolist(), frame["entity_key"].tolist(), frame["event_time"].tolist()
    for i in np.argsort(frame["event_time"].to_numpy(), kind="stable").tolist():
        if ids[i] in tiles:
            continue  # a copy of an update: the same one
        event = {
            "event_id": ids[i], "event_time": int(times[i]), "user_id": keys[i], "item_id": str(items[i]),
            "action": "CLICK" if clicks[i] else "IMPRESSION", "position": int(positions[i]),
            "propensity": float(propensities[i]),
        }  # fmt: skip
        update = aggregator.apply(event, int(times[i]))[-1]
        tiles[ids[i]] = (update["valid_until"], update["tiles"])
    frame = frame.copy()
    frame["valid_until"] = [tiles[i][0] for i in ids]
    frame["tiles"] = [tiles[i][1] for i in ids]
    return frame


def _records(frame: pd.DataFrame, names: list[str]) -> list[dict[str, Any]]:
    out = []
    tiled = "tiles" in frame.columns
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
                "valid_until": int(row.valid_until) if tiled else None,  # type: ignore[arg-type]
                "tiles": row.tiles if tiled else None,
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
        "valid_until": pa.array(frame["valid_until"] if "tiles" in frame.columns else [None] * n, pa.int64()),
        "tiles": pa.array(frame["tiles"] if "tiles" in frame.columns else [None] * n, pa.binary()),
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
    tiles: bool = True,
) -> tuple[int, pd.DataFrame]:
    """Writes the lake; returns how many files it holds, and each row's event id, entity, event
    time and valid_until (to tell the labels evaluated at their time from the others)."""
    names = NAMES[:n_features]
    writer = LakeWriter(settings, SchemaCatalog.load(settings.schemas_dir))

    def slice_of(offset: int, n: int) -> tuple[int, int]:
        # The stream arrives in time order: each flush covers the next slice of the 30 days.
        return T0 + SPAN_MS * offset // rows, T0 + SPAN_MS * (offset + n) // rows

    def rows_of(offset: int, n: int, part: int) -> pd.DataFrame:
        return feature_rows(
            n, entities, n_features, seed + part, span=slice_of(offset, n), duplicates=duplicates
        )

    frames, offset = [rows_of(0, FIRST_BATCH, 0)], FIRST_BATCH
    while offset < rows:
        n = min(batch_rows, rows - offset)
        frames.append(rows_of(offset, n, len(frames)))
        offset += n
    if tiles:
        started = time.perf_counter()
        frames = _split(with_tiles(pd.concat(frames, ignore_index=True)), [len(f) for f in frames])
        print(
            f"  tiles computed by the streaming engine in {time.perf_counter() - started:.0f} s", flush=True
        )
    (real,) = {
        p for p in writer.write("feature-updates", list(enumerate_rows(_records(frames[0], names))))[:1]
    }
    schema = pq.read_schema(real).remove_metadata()
    check = bulk_table(frames[0], 0, names, schema)
    assert check.schema.equals(schema), "bulk tables must have LakeWriter's schema"
    topic_dir = settings.lake_dir / "feature-updates"
    floats = {f.name for f in schema if pa.types.is_floating(f.type)}
    blobs = {f.name for f in schema if pa.types.is_binary(f.type)}
    offset = FIRST_BATCH
    for frame in frames[1:]:
        n = len(frame)
        table = bulk_table(frame, offset, names, schema)
        dates = pa.array([date_of(int(t)) for t in frame["event_time"].to_numpy()])
        for date in pc.unique(dates).to_pylist():
            folder = topic_dir / f"date={date}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                table.filter(pc.equal(dates, date)),
                folder / f"feature-updates+0+{offset}-{offset + n - 1}.parquet",
                # As LakeWriter: floats plain and uncompressed, blobs without a dictionary.
                use_dictionary=[f.name for f in schema if f.name not in floats | blobs],
                compression={f.name: "none" if f.name in floats else "snappy" for f in schema},
            )
        offset += n
    kept = ["event_id", "entity_key", "event_time", *(["valid_until"] if tiles else [])]
    index = pd.concat([f[kept] for f in frames], ignore_index=True)
    return len(list(topic_dir.rglob("*.parquet"))), index


def _split(frame: pd.DataFrame, sizes: list[int]) -> list[pd.DataFrame]:
    bounds = np.cumsum([0, *sizes])
    return [frame.iloc[a:b].reset_index(drop=True) for a, b in itertools.pairwise(bounds)]


def enumerate_rows(records: list[dict[str, Any]]) -> list[tuple[int, int, dict[str, Any]]]:
    return [(0, i, r) for i, r in enumerate(records)]


def feast_rows(settings: Settings, out: Path) -> None:
    """The same feature rows as the lake, in Feast's shape: one column per feature."""
    table = pq.read_table(settings.lake_dir / "feature-updates")
    keep = ["entity_key", "event_time", "write_time"] + [
        c for c in table.column_names if c.startswith(f"{FEATURE_SET}:")
    ]
    feast_name = {n: f"f{i:02d}" for i, n in enumerate(NAMES)}  # Feast's columns: f00, f01, ...
    names = [c.split(":", 1)[-1] for c in keep]
    table = table.select(keep).rename_columns([feast_name.get(n, n) for n in names])
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
    """(rows compared, rows whose 50 values differ), joined on entity and label time: the labels
    whose windows were not evaluated at their time (``ours`` holds only those)."""
    theirs = feast_result.copy()
    theirs["label_time"] = (theirs["event_timestamp"].astype("int64") // 1_000_000).astype("int64")
    names = [f"f{i:02d}" for i in range(n_features)]
    mine = ours.rename(columns={f"{FEATURE_SET}:{NAMES[i]}": n for i, n in enumerate(names)})
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
        files, index = build_lake(
            settings,
            rows,
            args.entities,
            args.features,
            batch_rows=batch_rows,
            seed=args.seed,
            duplicates=args.duplicates,
            tiles=not args.no_tiles,
        )
        labels = labels_frame(labels_n, args.entities, args.seed + 999)
        size = sum(p.stat().st_size for p in settings.lake_dir.rglob("*.parquet"))
        print(
            f"  lake: {rows:,} feature rows x {args.features} features in {files} files "
            f"({size / 2**30:.2f} GiB, {size / (rows * args.features):.1f} bytes per value), "
            f"built in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        refs = [f"{FEATURE_SET}:{n}" for n in NAMES[: args.features]]
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
        evaluated = (
            _evaluated(settings, labels, refs, index) if not args.no_tiles else np.zeros(labels_n, bool)
        )
        out["evaluated"] = int(evaluated.sum())
        if evaluated.any():
            out["evaluated_checked"] = _check_evaluated(settings, labels, refs, index, evaluated, nb_result)
        if with_feast:
            features_path, labels_path = workdir / "rows.parquet", workdir / "labels.parquet"
            feast_rows(settings, features_path)
            labels.to_parquet(labels_path)
            feast = run_feast(workdir, features_path, labels_path, args.features, args.repeat)
            if feast is not None:
                out["feast_s"], out["feast_cpu_s"] = feast["times_s"], feast["cpu_s"]
                out["feast_rows"], out["feast_version"] = feast["rows"], feast["version"]
                out["compared"], out["differ"] = compare_with_feast(
                    nb_result[~evaluated], pd.read_parquet(workdir / "feast_result.parquet"), args.features
                )
        return out
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _matched(settings: Settings, labels: pd.DataFrame, refs: list[str], index: pd.DataFrame) -> pd.DataFrame:
    """Each label's matched update (event-time mode) with its valid_until, untimed."""
    with open_offline_store(settings) as store:
        got = get_historical_features(store, labels, refs[:1], bitemporal=False, include_timestamps=True)
    times = got[f"{FEATURE_SET}:event_time"]
    first = index.drop_duplicates(["entity_key", "event_time"])
    return labels.assign(event_time=times.astype("Int64")).merge(
        first, on=["entity_key", "event_time"], how="left"
    )


def _evaluated(settings: Settings, labels: pd.DataFrame, refs: list[str], index: pd.DataFrame) -> np.ndarray:
    """Which labels came at or after their matched update's valid_until (event-time mode)."""
    matched = _matched(settings, labels, refs, index)
    until = matched["valid_until"].to_numpy(dtype=float, na_value=np.inf)
    return np.asarray(matched["label_time"].to_numpy() >= until)


def _check_evaluated(  # noqa: PLR0917 - a helper of scenario(), called once
    settings: Settings,
    labels: pd.DataFrame,
    refs: list[str],
    index: pd.DataFrame,
    evaluated: np.ndarray,
    result: pd.DataFrame,
    sample: int = 2_000,
) -> int:
    """For a sample of the evaluated labels, the training set's values equal the matched update's
    tiles evaluated at the label time, read from the lake row by row; returns how many."""
    matched = _matched(settings, labels, refs, index)
    rows = np.flatnonzero(evaluated)[:sample]
    with open_offline_store(settings) as store:
        for i in rows.tolist():
            key, t = matched.at[i, "entity_key"], int(matched.at[i, "event_time"])
            (blob,) = (
                store.query(
                    "SELECT tiles FROM feature_updates "
                    "WHERE entity_key = {k:String} AND event_time = {t:Int64} LIMIT 1",
                    {"k": key, "t": t},
                )
                .column(0)
                .cast(pa.binary())
                .to_pylist()
            )
            want = evaluate_tiles(blob, int(labels.at[i, "label_time"]))[0]
            for ref in refs:
                got, expected = result.at[i, ref], want[ref.split(":", 1)[1]]
                same = (pd.isna(got) and expected is None) or (
                    expected is not None and not pd.isna(got) and abs(float(got) - float(expected)) <= 1e-9
                )
                assert same, (key, t, ref, got, expected)
    return len(rows)


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
    print(
        f"  windows evaluated at the label time: {r['evaluated']:,} labels"
        + (f" ({r['evaluated_checked']:,} checked against their tiles)" if r.get("evaluated_checked") else "")
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
    parser.add_argument("--no-tiles", action="store_true", help="rows without tiles (no window evaluation)")
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
