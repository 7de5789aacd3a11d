"""The prediction service under load: latency at fixed rates, maximum throughput, batch throughput,
and the online-feature part alone against Feast's Python SDK on the same features.

    .venv/bin/python benchmarks/serving.py                 # everything (a few minutes)
    .venv/bin/python benchmarks/serving.py --quick         # short passes while developing
    .venv/bin/python benchmarks/serving.py --no-feast

Set-up (in a temporary directory, nothing shared with a running stack): an embedded broker,
two feature sets of 25 features each (``bench_user`` keyed by user_id, ``bench_item`` by
item_id: 50 online features per entity), 10,000 users and 1,000 items in the LMDB online
store, and a gradient-boosted model (HistGradientBoostingClassifier, up to 100 trees; the
server compiles them to C at load) on the 50 features, registered and promoted through the
real registry. One server process is started with ``headwater serve`` (rate limits off). Load
comes from h2load (nghttp2's HTTP/2 load generator, in C, installed by ``infra/setup.sh``)
posting gRPC frames, one h2load process and connection per request body: a Python gRPC client
needs as much CPU per call as the server, and on two cores it would take the server's second
core. h2load sends the same body on each of its calls, so four bodies (four (user, item)
pairs) make the single-entity load and two bodies of 100 pairs the batch load; the whole
online store is in the page cache either way.

- open loop at fixed rates (500, 1,000, 2,000 calls/s) of single-entity calls, from h2load
  processes of 100 calls/s each on timing scripts (h2load's timers run late by a fixed share:
  a pass that reaches under 97 % of its rate runs again once on a corrected schedule):
  p50 / p99 of h2load's per-call latency;
- closed loop with 32 calls outstanding: the maximum single-entity calls/s of the server;
- closed loop of 100-entity calls, 4 outstanding: scored items/s.

A 2 s closed-loop warm-up comes first; each pass runs ``--duration`` seconds. h2load sees HTTP status 200 for
every gRPC answer, errors included, so the passes count gRPC statuses from the server's
``/metrics``; the server's CPU time per call comes from /proc, and so do its event log's sender
process's (it encodes and produces the prediction events) and the embedded broker's: both run
on the same two cores, and the broker takes every prediction event the passes log (one per
entity, ~0.6 KB with its 50 feature values and two event times).

Targets (issue 5, one server process): p99 <= 5 ms at 1,000 calls/s, >= 3,000 single-entity
predictions/s, >= 100,000 scored items/s. The machine's cores are shared by the server and the
load generators: the figures are for the whole machine as it is. Its speed varies by stretches
of minutes, so two fixed workloads are timed before and after the passes (``machine check``).
They catch a machine that is slower at everything; they do not catch the variation between
runs seen under load (server and sender CPU per call 20 % apart with the same check figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features.definitions import Count, FeatureSet, Max, Mean  # noqa: E402
from features.predicates import Eq  # noqa: E402
from features.repository import FeatureRepository  # noqa: E402

WINDOWS = ["5m", "1h", "6h", "24h", "7d"]
N_USERS, N_ITEMS = 10_000, 1_000
TARGET_P99_MS, TARGET_SINGLE, TARGET_ITEMS = 5.0, 3_000.0, 100_000.0


def _features() -> list[Any]:
    return [
        Count(windows=WINDOWS, where=Eq("action", "IMPRESSION"), name="impressions"),
        Count(windows=WINDOWS, where=Eq("action", "CLICK"), name="clicks"),
        Mean("position", windows=WINDOWS, name="mean_position"),
        Mean("propensity", windows=WINDOWS, name="mean_propensity"),
        Max("position", windows=WINDOWS, name="max_position"),
    ]


def bench_repository() -> FeatureRepository:
    """Two feature sets of 25 features: 50 online features per (user, item)."""
    user = FeatureSet(
        "bench_user",
        entity="user_id",
        source="clicks",
        features=_features(),
        owner="bench",
        description="benchmark",
    )
    item = FeatureSet(
        "bench_item",
        entity="item_id",
        source="clicks",
        features=_features(),
        owner="bench",
        description="benchmark",
    )
    return FeatureRepository([user, item])


# -- set-up ---------------------------------------------------------------------------------------
def online_rows(repository: FeatureRepository, end: int) -> dict[str, list[Any]]:
    """What the stream writes online for each user and item: values and window tiles, computed by
    the engine from synthetic clicks over the week before ``end`` (each entity's last event at a
    random time in it, so most reads evaluate the windows at the read's time from the tiles)."""
    from features.engine import Aggregator

    rng = random.Random(11)
    week = 7 * 86_400_000

    def click(n: int) -> dict[str, Any]:
        return {
            "event_id": f"e{n}", "event_time": end - rng.randint(0, week),
            "user_id": f"u{rng.randrange(N_USERS)}", "item_id": f"i{rng.randrange(N_ITEMS)}",
            "action": "CLICK" if rng.random() < 0.05 else "IMPRESSION", "position": rng.randint(1, 3),
            "campaign": "all", "propensity": rng.choice([0.0125, 0.025]), "session_id": None,
            "user_features": {},
        }  # fmt: skip

    events = sorted((click(n) for n in range(4 * N_USERS)), key=lambda e: e["event_time"])
    rows: dict[str, list[Any]] = {}
    for fs in repository.feature_sets:
        aggregator, latest = Aggregator(fs), {}
        for event in events:
            for u in aggregator.apply(event, event["event_time"]):
                key = u["entity_key"]
                latest[key] = (key, u["event_time"], u["values"], u["valid_until"], u["tiles"])
        rows[fs.name] = list(latest.values())
    return rows


def setup(workdir: Path, rows_file: Path | None = None) -> tuple[Any, Any, dict[str, list[str]]]:
    """Broker, topics, online data and the registered model; returns (settings, broker, reads).
    ``rows_file``: the online rows (:func:`online_rows`' result, pickled) instead of new ones."""
    import numpy as np
    import pandas as pd
    from confluent_kafka.admin import AdminClient

    from headwater.settings import load_settings
    from models.artifact import dump_pipeline
    from models.pipeline import ModelPipeline
    from models.spec import ModelSpec
    from registry.registry import Registry
    from serving.online_store import open_online_store
    from streams.broker import EmbeddedBroker
    from streams.topics import TopicCatalog

    base = load_settings(data_dir=workdir / "data", feature_repository="benchmarks.serving:bench_repository")
    broker = EmbeddedBroker(base)
    info = broker.start()
    try:
        settings = base.model_copy(update={"bootstrap_servers": info.bootstrap})
        TopicCatalog(settings).create_all(AdminClient({"bootstrap.servers": info.bootstrap}))
        repository = bench_repository()
        refs = [f"{fs.name}:{f.name}" for fs in repository for f in fs.features]
        spec = ModelSpec(
            name="bench_model",
            entity_keys=("user_id", "item_id"),
            features=tuple(refs),
            label="clicked",
            task="classification",
            estimator="hist_gradient_boosting",
            params={"max_iter": 100},
            owner="bench",
        )
        rng = np.random.default_rng(7)
        n = 20_000
        frame = pd.DataFrame(
            {"user_id": ["u"] * n, "item_id": ["i"] * n, **{r: rng.random(n) * 100 for r in refs}}
        )
        frame["clicked"] = (frame[refs[0]] + frame[refs[30]] + rng.normal(0, 30, n) > 110).astype(int)
        pipeline = ModelPipeline(spec, repository).fit(frame)
        with Registry(settings, actor="bench") as registry:
            mv = registry.register(
                spec.name,
                dump_pipeline(pipeline),
                feature_refs=refs,
                metadata={"spec": spec.model_dump(mode="json")},
            )
            registry.promote(spec.name, mv.version, force=True, reason="benchmark")
        now = time.time_ns() // 1_000_000 - 60_000
        with open_online_store(settings) as store:
            given: dict[str, list[Any]] = (
                pickle.loads(rows_file.read_bytes())  # benchmarks/serving_vs_base.py's file
                if rows_file is not None
                else online_rows(repository, now)
            )
            for fs, rows in given.items():
                store.put_batch(fs, rows)
    except BaseException:
        broker.stop()  # never leave a broker behind
        raise
    return settings, broker, pipeline.reads


@dataclass
class Server:
    proc: subprocess.Popen[str]
    target: str
    metrics_url: str


def start_server(settings: Any, workdir: Path, **overrides: Any) -> Server:
    """``headwater serve`` in a subprocess, on free ports, rate limits off (``overrides``: more
    ``serving`` settings)."""
    import yaml

    serving = {
        "port": 0,
        "metrics_port": 0,
        "client_rate_limit": 0.0,
        "max_in_flight": 4096,
        "default_timeout_ms": 0,
        **overrides,
    }
    data = settings.model_copy(update={"serving": settings.serving.model_copy(update=serving)})
    config = workdir / "settings.yaml"
    config.write_text(yaml.safe_dump(data.model_dump(mode="json", exclude_none=True)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwater.cli", "--config", str(config), "serve"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"serving ready: grpc://(\S+) metrics (\S+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
            return Server(proc, found.group(1), found.group(2))
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


# -- load generation (h2load, separate processes) ---------------------------------------------------
PATH = "/headwater.serving.v1.PredictionService/Predict"
OPEN_LOOP_RATE_PER_PROCESS = 100


def _requests(n_entities: int, count: int, seed: int) -> list[bytes]:
    """``count`` serialized requests of ``n_entities`` (user, item) pairs each, one user per
    request: one entity as a message, many column-wise, as the ``headwater`` client sends them."""
    from serving.api.v1 import prediction_pb2 as pb

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        request = pb.PredictRequest(model="bench_model", client_id=f"bench-{seed}")
        user = f"u{rng.randrange(N_USERS)}"
        items = [f"i{rng.randrange(N_ITEMS)}" for _ in range(n_entities)]
        if n_entities == 1:
            request.entities.add().keys.update({"user_id": user, "item_id": items[0]})
        else:
            request.key_columns.add(name="user_id", values=[user])  # for every entity
            request.key_columns.add(name="item_id", values=items)
        out.append(request.SerializeToString())
    return out


def grpc_bodies(workdir: Path, n_entities: int, count: int) -> list[Path]:
    """Request bodies as gRPC frames (uncompressed flag, big-endian length, message), one per file."""
    paths = []
    for i, message in enumerate(_requests(n_entities, count, seed=n_entities)):
        path = workdir / f"request-{n_entities}-{i}.bin"
        path.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
        paths.append(path)
    return paths


def scrape_statuses(metrics_url: str) -> dict[str, float]:
    """Predict calls answered so far by gRPC status, from the server's Prometheus /metrics; under
    ``"events dropped"`` the prediction events it could not log (every reason), under
    ``"refused by gRPC"`` the calls gRPC's core refused before the service took them."""
    from urllib.request import urlopen

    counts: dict[str, float] = {}
    with urlopen(metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("headwater_serving_request_seconds_count{"):
                status = re.search(r'status="([^"]*)"', line)
                key = status.group(1) if status else "?"
                counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
            elif line.startswith("headwater_serving_events_dropped_total{"):
                counts["events dropped"] = counts.get("events dropped", 0.0) + float(line.rsplit(" ", 1)[1])
            elif line.startswith("headwater_serving_refused_by_grpc_total "):
                counts["refused by gRPC"] = float(line.rsplit(" ", 1)[1])
    return counts


def admitted_p99_bound(latencies: list[int], admitted: int) -> float:
    """An upper bound of the p99 of the ``admitted`` calls among ``latencies`` (all calls, sorted),
    when which they are is not known (h2load sees HTTP 200 for every gRPC answer): at most 1 %
    of the admitted calls are slower than their p99, so it is at most the (that many + 1)-th
    slowest of all. Exact when every call was admitted."""
    if not admitted or not latencies:
        return float("nan")
    above = admitted - 1 - int(0.99 * admitted)
    return float(latencies[max(0, len(latencies) - 1 - above)])


def h2load_binary() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise SystemExit("h2load not found: run `bash infra/setup.sh` (it installs Debian's nghttp2-client)")
    return found


def load(
    server: Server,
    bodies: list[Path],
    *,
    duration: float,
    n_entities: int = 1,
    rate: float | None = None,
    outstanding: int = 16,
) -> dict[str, float]:
    """h2load processes for ``duration`` seconds: open loop at ``rate`` calls/s in all, or closed
    with ``outstanding`` calls in flight (one process and connection per body).

    Open loop: h2load's ``--rps`` sends in bursts (its timer ticks at most every 10 ms, all
    connections' ticks together), so each process follows a timing script instead, at
    ``OPEN_LOOP_RATE_PER_PROCESS`` calls/s, the processes' schedules interleaved; calls/s is
    what was reached. Latency is h2load's per-call time (sent -> answer complete), from its
    log. h2load sees HTTP/2 status 200 for every gRPC answer, errors included: the gRPC
    statuses are counted by the server's ``/metrics`` before and after the pass.
    """
    binary = h2load_binary()
    url = f"http://{server.target}{PATH}"
    runs: list[tuple[list[str], Path]] = []  # (h2load's options and URL, request body)
    if rate is not None:
        processes = max(1, math.ceil(rate / OPEN_LOOP_RATE_PER_PROCESS))
        per = rate / processes
        for k in range(processes):
            script = bodies[0].parent / f"timing-{rate:g}-{k}.txt"
            offsets = ((k / rate + i / per) * 1e3 for i in range(int(duration * per)))
            script.write_text("".join(f"{ms:.3f}\t{url}\n" for ms in offsets))
            runs.append((["--timing-script-file", str(script), "-m", "64"], bodies[k % len(bodies)]))
    else:
        streams = str(max(1, outstanding // len(bodies)))
        runs = [(["-D", f"{duration:g}", "-m", streams, url], body) for body in bodies]
    before = scrape_statuses(server.metrics_url)
    started = time.perf_counter()
    procs = []
    for k, (options, body) in enumerate(runs):
        log_file = body.parent / f"h2load-{k}.log"
        log_file.unlink(missing_ok=True)  # h2load appends
        command = [
            binary, "-c", "1", "--log-file", str(log_file), "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers", *options,
        ]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append((proc, log_file))
    latencies: list[int] = []
    http_failed = 0
    for proc, log_file in procs:
        out, _ = proc.communicate(timeout=duration * 3 + 120)
        if proc.returncode != 0:
            raise SystemExit(f"h2load failed (exit {proc.returncode}):\n{out}")
        found = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
        if found is None:
            raise SystemExit(f"h2load printed no summary:\n{out}")
        http_failed += sum(int(x) for x in found.groups()[1:])
        latencies += [int(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line]
        log_file.unlink()
    elapsed = time.perf_counter() - started if rate is not None else duration
    after = scrape_statuses(server.metrics_url)
    answered = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    dropped = int(answered.pop("events dropped", 0.0))
    refused = int(answered.pop("refused by gRPC", 0.0))
    latencies.sort()
    calls = len(latencies)
    ok = int(answered.get("OK", 0.0))
    return {
        "calls": calls,
        "errors": http_failed + refused + int(sum(v for k, v in answered.items() if k != "OK")),
        "events_dropped": dropped,
        "grpc_ok": ok,
        "refused_by_grpc": refused,
        "answered": int(sum(answered.values())),
        "elapsed_s": elapsed,
        "calls_per_s": calls / elapsed,
        "items_per_s": calls * n_entities / elapsed,
        "p50_ms": latencies[calls // 2] / 1e3 if calls else float("nan"),
        "p99_ms": latencies[min(calls - 1, int(calls * 0.99))] / 1e3 if calls else float("nan"),
        "admitted_p99_bound_ms": admitted_p99_bound(latencies, min(ok, calls)) / 1e3,
    }


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):  # ended meanwhile
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the online-feature part alone, against Feast --------------------------------------------------
def feature_part(
    settings: Any, workdir: Path, reads: dict[str, list[str]], calls: int, feast: bool
) -> dict[str, Any]:
    """The server's feature reads (two sets x 25 for a (user, item)), and one set of 50 features
    per user in Headwater's LMDB and in Feast (SQLite online store), on the same values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.features_online import make_rows, run_feast, time_reads
    from serving.online_store import open_online_store

    rng = random.Random(3)
    out: dict[str, Any] = {}
    with open_online_store(settings) as store:
        pairs = [(f"u{rng.randrange(N_USERS)}", f"i{rng.randrange(N_ITEMS)}") for _ in range(calls)]
        user_names, item_names = reads["bench_user"], reads["bench_item"]

        def request_reads(batch: list[str]) -> object:
            user, item = batch[0].split("|")
            return (
                store.get_batch("bench_user", [user], user_names),
                store.get_batch("bench_item", [item], item_names),
            )

        def request_values(batch: list[str]) -> object:  # what the server reads: no dicts
            user, item = batch[0].split("|")
            return (
                store.get_values("bench_user", [user], user_names),
                store.get_values("bench_item", [item], item_names),
            )

        out["headwater 2 sets x 25 (a request's reads)"] = time_reads(
            request_reads, [[f"{u}|{i}"] for u, i in pairs], 100
        )
        out["headwater 2 sets x 25, get_values (server)"] = time_reads(
            request_values, [[f"{u}|{i}"] for u, i in pairs], 100
        )
        features, rows = make_rows(N_USERS, 50)
        keys = [f"user-{i:06d}" for i in range(N_USERS)]
        event_time_ms = (int(time.time()) - 3_600) * 1000
        store.put_batch("bench_flat", [(k, event_time_ms, r) for k, r in zip(keys, rows, strict=True)])
        spec: dict[str, Any] = {
            "features": features,
            "warmup": 100,
            "probe": [keys[0], keys[-1]],
            "cases": {
                "1x50": [[rng.choice(keys)] for _ in range(calls)],
                "100x50": [rng.sample(keys, 100) for _ in range(max(100, calls // 10))],
            },
        }
        for case, lookups in spec["cases"].items():
            out[f"headwater lmdb {case}"] = time_reads(
                lambda b: store.get_batch("bench_flat", b, features), lookups, 100
            )
            out[f"headwater lmdb {case} get_values"] = time_reads(
                lambda b: store.get_values("bench_flat", b, features), lookups, 100
            )
    if feast:
        feast_dir = workdir / "feast"
        feast_dir.mkdir()
        (feast_dir / "lookups.json").write_text(json.dumps(spec))
        table = pa.table(
            {
                "user_id": keys,
                "event_timestamp": pa.array([event_time_ms] * len(keys), pa.timestamp("ms", tz="UTC")),
                **{f: [r[f] for r in rows] for f in features},
            }
        )
        pq.write_table(table, feast_dir / "rows.parquet")
        result = run_feast(feast_dir)
        if "error" in result:
            out["feast"] = result["error"].splitlines()[-1] if result["error"] else "unavailable"
        else:
            for case, figures in result["cases"].items():
                out[f"feast {result['feast_version']} sqlite {case}"] = figures
    return out


def run_passes(settings: Any, workdir: Path, duration: float, broker_pid: int) -> dict[str, Any]:
    """Every load pass against one server process; its CPU time per call from /proc, and the
    embedded broker's (on the same cores: it stores every prediction event the passes log)."""
    figures: dict[str, Any] = {}
    server = start_server(settings, workdir)
    try:
        singles = grpc_bodies(workdir, 1, 4)
        batches = grpc_bodies(workdir, 100, 2)
        passes: dict[str, dict[str, Any]] = {
            **{f"open {rate}/s": {"bodies": singles, "rate": rate} for rate in (500, 1_000, 2_000)},
            "max single": {"bodies": singles, "outstanding": 32},
            "batch 100": {"bodies": batches, "n_entities": 100, "outstanding": 4},
        }
        load(server, singles, duration=2.0, outstanding=32)  # warm-up: first calls, caches, branches
        (sender,) = child_pids(server.proc.pid)  # the event log's sender process
        for name, options in passes.items():
            before, broker_before = cpu_seconds(server.proc.pid), cpu_seconds(broker_pid)
            sender_before = cpu_seconds(sender)
            figures[name] = load(server, duration=duration, **options)
            rate = options.get("rate")
            if rate is not None and figures[name]["calls_per_s"] < 0.97 * rate:
                # h2load's timers run late by a fixed share (~7 % here): one corrected schedule.
                before, broker_before = cpu_seconds(server.proc.pid), cpu_seconds(broker_pid)
                sender_before = cpu_seconds(sender)
                corrected = {**options, "rate": rate * rate / figures[name]["calls_per_s"]}
                figures[name] = load(server, duration=duration, **corrected)
            calls = max(1, figures[name]["answered"])
            figures[name]["server_cpu_ms_per_call"] = (cpu_seconds(server.proc.pid) - before) * 1e3 / calls
            figures[name]["sender_cpu_ms_per_call"] = (cpu_seconds(sender) - sender_before) * 1e3 / calls
            figures[name]["broker_cpu_ms_per_call"] = (cpu_seconds(broker_pid) - broker_before) * 1e3 / calls
    finally:
        server.proc.terminate()
        server.proc.wait(30)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short passes (development)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load pass")
    parser.add_argument("--no-feast", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--rows", type=Path, help="the online rows, pickled (benchmarks/serving_vs_base.py)")
    args = parser.parse_args()
    duration = 3.0 if args.quick else args.duration
    figures: dict[str, Any] = {"machine check ms": [machine_check()]}
    with tempfile.TemporaryDirectory(prefix="hw-bench-serving-") as tmp:
        workdir = Path(tmp)
        settings, broker, reads = setup(workdir, args.rows)
        try:
            info = broker.info()
            assert info is not None
            figures.update(run_passes(settings, workdir, duration, info.pid))
            figures["feature part"] = feature_part(
                settings, workdir, reads, 500 if args.quick else 3_000, feast=not args.no_feast
            )
        finally:
            broker.stop()
    figures["machine check ms"].append(machine_check())
    return report(figures, args)


def machine_check() -> tuple[float, float]:
    """Milliseconds of two fixed single-threaded workloads, best of five each: one like the
    request path's (Python calls, dicts, small numpy arrays), one gathering from memory (2M
    random reads from 128 MB, past the caches). The same code on this machine took 1.5x as long
    in some stretches of minutes as in others (seen here, in-process reads included): these
    show such a stretch. Lower is faster."""
    import numpy as np

    row = np.arange(50, dtype=np.float64)
    table = np.arange(1 << 24, dtype=np.int64)
    at = np.random.default_rng(0).integers(0, len(table), 1 << 21)

    def python() -> float:
        started = time.perf_counter()
        for i in range(20_000):
            values = {f"f{j}": j * 0.5 for j in range(8)}
            np.array([list(values.values())]) @ row[:8]
            sorted(values, key=values.__getitem__)[i % 8].encode()
        return (time.perf_counter() - started) * 1e3

    def memory() -> float:
        started = time.perf_counter()
        table[at].sum()
        return (time.perf_counter() - started) * 1e3

    return min(python() for _ in range(5)), min(memory() for _ in range(5))


def report(figures: dict[str, Any], args: argparse.Namespace) -> int:
    print(f"prediction service, one server process, {os.cpu_count()} cores shared with h2load")
    (python_before, memory_before), (python_after, memory_after) = figures["machine check ms"]
    print(
        f"machine check (fixed workloads; lower is faster): Python {python_before:.0f} ms before "
        f"the passes, {python_after:.0f} ms after; memory {memory_before:.1f} ms, {memory_after:.1f} ms"
    )
    print(
        f"{'pass':<16}{'calls/s':>10}{'items/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'server CPU ms/call':>20}{'its sender':>12}{'broker CPU ms/call':>20}{'events dropped':>16}"
    )
    for name in ("open 500/s", "open 1000/s", "open 2000/s", "max single", "batch 100"):
        f = figures[name]
        print(
            f"{name:<16}{f['calls_per_s']:>10,.0f}{f['items_per_s']:>11,.0f}{f['p50_ms']:>9.2f}{f['p99_ms']:>9.2f}"
            f"{f['errors']:>8}{f['server_cpu_ms_per_call']:>20.3f}{f['sender_cpu_ms_per_call']:>12.3f}"
            f"{f['broker_cpu_ms_per_call']:>20.3f}{f['events_dropped']:>16,}"
        )
    print("\nonline-feature part alone, per call (ms):")
    for name, f in figures["feature part"].items():
        print(
            f"  {name:<44}"
            + (f"p50 {f['p50_ms']:.4f}  p99 {f['p99_ms']:.4f}" if isinstance(f, dict) else f"{f}")
        )
    checks = [
        (f"p99 at 1,000/s <= {TARGET_P99_MS} ms", figures["open 1000/s"]["p99_ms"] <= TARGET_P99_MS),
        (f"single-entity >= {TARGET_SINGLE:,.0f}/s", figures["max single"]["calls_per_s"] >= TARGET_SINGLE),
        (f"scored items >= {TARGET_ITEMS:,.0f}/s", figures["batch 100"]["items_per_s"] >= TARGET_ITEMS),
    ]
    print("\ntargets:")
    for text, ok in checks:
        print(f"  {text}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
