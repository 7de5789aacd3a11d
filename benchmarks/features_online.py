"""Online feature reads: Headwater's online store against Feast, on the same data, in one run.

    .venv/bin/python benchmarks/features_online.py            # LMDB, Redis and Feast
    .venv/bin/python benchmarks/features_online.py --no-feast # Headwater only

Data: ``--entities`` users (default 10,000) x 50 features (half float, half int), one
feature set. Cases: 1 entity x 50 features and 100 entities x 50 features per call, random
entities, p50/p99 latency of the whole call as the application sees it (values decoded into
Python objects). LMDB runs in-process (the embedded default); Redis, for information, is a
real ``redis-server`` on loopback started here. Feast is the Python SDK's
``get_online_features(...).to_dict()`` with its local SQLite online store, run in its own
virtualenv (``benchmarks/feast_env.sh`` creates ``.venv-feast``) by
``benchmarks/feast_online.py``, which prints its figures as JSON.

Targets (issue 3): LMDB p99 <= 0.1 ms for 1 x 50 and <= 2 ms for 100 x 50, and >= 20x faster
than Feast in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headwater.settings import load_settings  # noqa: E402
from serving.online_store import OnlineStore, open_online_store  # noqa: E402

FEATURE_SET = "user_features"
CASES = {"1x50": 1, "100x50": 100}
TARGET_P99_MS = {"1x50": 0.1, "100x50": 2.0}
TARGET_SPEEDUP = 20.0


def make_rows(entities: int, n_features: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Half float features, half int, deterministic."""
    rng = random.Random(7)
    features = [f"f{i:02d}" for i in range(n_features)]

    def value(i: int) -> float | int:
        return round(rng.random() * 100, 6) if i % 2 == 0 else rng.randrange(10_000)

    return features, [{f: value(i) for i, f in enumerate(features)} for _ in range(entities)]


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {
        "p50_ms": ordered[len(ordered) // 2] / 1e6,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6,
        "n": len(ordered),
    }


def time_reads(
    read: Callable[[list[str]], object], lookups: list[list[str]], warmup: int
) -> dict[str, float]:
    for keys in lookups[:warmup]:
        read(keys)
    samples = []
    for keys in lookups:
        t = time.perf_counter_ns()
        read(keys)
        samples.append(time.perf_counter_ns() - t)
    return percentiles(samples)


def bench_store(
    store: OnlineStore,
    *,
    keys: list[str],
    rows: list[dict[str, Any]],
    event_time_ms: int,
    spec: dict[str, Any],
) -> dict[str, Any]:
    started = time.perf_counter()
    store.put_batch(FEATURE_SET, [(k, event_time_ms, r) for k, r in zip(keys, rows, strict=True)])
    load_s = time.perf_counter() - started

    features = spec["features"]

    def read(batch: list[str]) -> object:
        return store.get_batch(FEATURE_SET, batch, features)

    cases = {case: time_reads(read, lookups, spec["warmup"]) for case, lookups in spec["cases"].items()}
    probe_rows = store.get_batch(FEATURE_SET, spec["probe"], features)
    probe = {k: r.values for k, r in zip(spec["probe"], probe_rows, strict=True)}
    return {"load_s": load_s, "cases": cases, "probe": probe}


@contextmanager
def redis_server() -> Iterator[str | None]:
    """A throwaway redis-server on a free loopback port, stopped by its own pid; None if absent."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    ready = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"Ready to accept connections" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{port}/0" if ready.wait(10) and proc.poll() is None else None
    finally:
        proc.terminate()
        proc.wait(10)


def run_feast(workdir: Path) -> dict[str, Any]:
    """Feast in its own virtualenv, as a subprocess; {'error': why} when it cannot run."""
    env_script = ROOT / "benchmarks" / "feast_env.sh"
    setup = subprocess.run(["bash", str(env_script)], capture_output=True, text=True, check=False)
    if setup.returncode != 0:
        return {"error": f"could not create Feast's virtualenv:\n{setup.stderr[-3000:]}"}
    venv = Path(setup.stdout.strip().splitlines()[-1])
    python = (venv if venv.is_absolute() else ROOT / venv) / "bin" / "python"
    run = subprocess.run(
        [str(python), str(ROOT / "benchmarks" / "feast_online.py"), str(workdir)],
        capture_output=True, text=True, check=False, timeout=1800,
    )  # fmt: skip
    if run.returncode != 0:
        return {"error": f"Feast's benchmark failed:\n{run.stderr[-3000:]}"}
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def same_values(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> bool:
    def close(x: Any, y: Any) -> bool:
        return math.isclose(x, y) if isinstance(x, float) else bool(x == y)

    return a.keys() == b.keys() and all(close(a[k][f], b[k][f]) for k in a for f in a[k])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--calls", type=int, default=3_000, help="timed 1 x N calls (100 x N: a third)")
    parser.add_argument("--no-feast", action="store_true")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    event_time_ms = (int(time.time()) - 3_600) * 1000
    features, rows = make_rows(args.entities, args.features)
    keys = [f"user-{i:06d}" for i in range(args.entities)]
    rng = random.Random(11)
    spec: dict[str, Any] = {
        "features": features,
        "warmup": 100,
        "probe": [keys[0], keys[len(keys) // 2], keys[-1]],
        "cases": {
            "1x50": [[rng.choice(keys)] for _ in range(args.calls)],
            "100x50": [rng.sample(keys, 100) for _ in range(max(200, args.calls // 3))],
        },
    }
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hw-bench-online-") as tmp:
        workdir = Path(tmp)
        (workdir / "lookups.json").write_text(json.dumps(spec))
        table = pa.table(
            {
                "user_id": keys,
                "event_timestamp": pa.array([event_time_ms] * len(keys), pa.timestamp("ms", tz="UTC")),
                **{f: [r[f] for r in rows] for f in features},
            }
        )
        pq.write_table(table, workdir / "rows.parquet")

        data: dict[str, Any] = {"keys": keys, "rows": rows, "event_time_ms": event_time_ms, "spec": spec}
        settings = load_settings(data_dir=workdir / "data")
        with open_online_store(settings) as store:
            results["headwater lmdb"] = bench_store(store, **data)
        if not args.no_redis:
            with redis_server() as url:
                if url is None:
                    results["headwater redis"] = {"error": "redis-server is not installed (make setup)"}
                else:
                    redis_settings = load_settings(
                        data_dir=workdir / "data", online_store={"type": "redis", "redis_url": url}
                    )
                    with open_online_store(redis_settings) as store:
                        results["headwater redis"] = bench_store(store, **data)
        if not args.no_feast:
            results["feast sqlite"] = run_feast(workdir)

    return report(results, args)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    print(f"online reads: {args.entities:,} entities x {args.features} features, p50 / p99 per call (ms)")
    print(f"{'backend':<22}{'load s':>8}  " + "  ".join(f"{c + ' p50':>12}{c + ' p99':>12}" for c in CASES))
    for name, res in results.items():
        if "error" in res:
            print(f"{name:<22}unavailable: {res['error']}")
            continue
        label = name + (f" {res['feast_version']}" if "feast_version" in res else "")
        figures = [res["cases"][c] for c in CASES]
        cells = "  ".join(f"{f['p50_ms']:>12.4f}{f['p99_ms']:>12.4f}" for f in figures)
        print(f"{label:<22}{res['load_s']:>8.2f}  {cells}")

    lmdb, feast = results["headwater lmdb"], results.get("feast sqlite", {})
    ok = True
    print("\ntargets:")
    for case, limit in TARGET_P99_MS.items():
        p99 = lmdb["cases"][case]["p99_ms"]
        ok &= p99 <= limit
        print(f"  lmdb {case} p99 {p99:.4f} ms <= {limit} ms: {'PASS' if p99 <= limit else 'FAIL'}")
    if "cases" in feast:
        if not same_values(lmdb["probe"], feast["probe"]):
            print("  WARNING: Feast and Headwater returned different values for the probe entities")
            ok = False
        for case in CASES:
            for q in ("p50_ms", "p99_ms"):
                speedup = feast["cases"][case][q] / lmdb["cases"][case][q]
                passed = speedup >= TARGET_SPEEDUP
                ok &= passed
                print(f"  lmdb vs feast {case} {q[:3]}: {speedup:,.0f}x >= {TARGET_SPEEDUP:.0f}x: "
                      f"{'PASS' if passed else 'FAIL'}")  # fmt: skip
    elif not args.no_feast:
        print("  Feast comparison not run (see above)")
        ok = False
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
