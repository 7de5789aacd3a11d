"""Streaming features end to end through the broker, against Quix Streams in the same run.

    .venv/bin/python benchmarks/features_streaming.py [--events 300000] [--rate 5000] [--seconds 20]

One run starts an embedded broker in a temporary directory, produces ``--events`` Avro click
events keyed by user (synthetic, fixed seed: 10,000 users with a Zipf-like skew, ~200 events/s
of event time; see ``benchmarks/features_engine.py``) and measures, each pinned to one core:

* **Headwater**, on each engine (Faust, the default, through ``benchmarks/faust_streaming.py``,
  and the native ``StreamRunner``): the feature processor (``FeatureProcessor``) for a
  three-window count/sum feature set (count and sum(position) over 1m, 1h, 24h per user),
  from the broker to ``feature-updates`` with its state committed to LMDB every batch, in a
  subprocess; events/s of CPU time (all threads of the process, so librdkafka's too) and of
  wall time, from its first non-empty batch to its last event;
* **Quix Streams** (in its own virtualenv, ``benchmarks/quix_env.sh``, driven through
  ``benchmarks/quix_streaming.py``) on the same topic and events: a keyed 1-minute tumbling
  count + sum(position) (the issue's reference, ~25,000 events/s here), then the same over
  the three windows 1m/1h/24h as three branches;
* **freshness**: on a second, empty embedded broker, with the feature processor and the
  online-store writer running (``processors.worker.run_processors`` in a worker subprocess,
  unpinned, on the default engine), clicks produced at a steady ``--rate`` for ``--seconds``
  (a deadline loop), and
  for every 10th event the time from its ``send`` to its value (an online-store row with an
  event time at least its own) being readable from the LMDB online store, polled every 5 ms
  from this process; p50/p99/max.

The machine has two cores: the broker and the producer share them with what is measured, and
so does anything else running at the time (check ``uptime``); the CPU-time figures are the
per-core ones, the wall-time and freshness figures depend on that load.

Targets (issue 3): Headwater's events/s per core >= Quix Streams' in the same run, and
freshness p99 <= 1 s. The broker, the subprocesses and the temporary directory are stopped
and removed by this script, by their own process ids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from features.definitions import Count, FeatureSet, Sum
from features.repository import FeatureRepository
from headwater.settings import Settings, load_settings
from streams.broker import EmbeddedBroker
from streams.catalog import SchemaCatalog
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog

ROOT = Path(__file__).resolve().parents[1]
# The project before benchmarks/ (Python puts a script's folder first), whose serving.py would
# hide the serving package; benchmarks/ last, for the sibling scripts imported below.
_BENCH = ROOT / "benchmarks"
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() not in (ROOT, _BENCH))]
sys.path.append(str(ROOT / "benchmarks"))
from features_engine import clicks  # noqa: E402 - benchmarks/ is not a package

WINDOWS = ["1m", "1h", "24h"]
WINDOWS_MS = [60_000, 3_600_000, 86_400_000]
STREAMING = FeatureSet(
    "bench_streaming",
    entity="user_id",
    source="clicks",
    owner="bench",
    description="Three-window count/sum per user: the streaming benchmark's feature set.",
    features=[Count(windows=WINDOWS, name="events"), Sum("position", windows=WINDOWS, name="position_sum")],
)
# What the worker subprocess loads as ``settings.feature_repository`` (benchmarks/ on its path).
REPOSITORY = FeatureRepository([STREAMING])
PROCESSOR = f"features-{STREAMING.name}"
USERS = 10_000

THROUGHPUT_TARGET_NOTE = ">= Quix Streams (1m tumbling) in this run"
FRESHNESS_TARGET_MS = 1000.0


def bench_settings(data_dir: Path, bootstrap: str, prefix: str = "") -> Settings:
    return load_settings(
        data_dir=data_dir,
        bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        feature_repository="features_streaming:REPOSITORY",
    )


def one_core() -> int:
    """The core the measured processes are pinned to: the last one this process may use."""
    return max(os.sched_getaffinity(0))


# --- roles run in subprocesses -----------------------------------------------------------------


def role_headwater(args: argparse.Namespace) -> dict[str, Any]:
    """The feature processor on ``args.events`` events already in the topic, pinned to one core."""
    from features.engine import EntityState
    from processors.features import FeatureProcessor
    from processors.runtime import StreamRunner
    from processors.state_store import StateStore, StoredStates

    os.sched_setaffinity(0, {args.core})  # before the clients start their threads: they inherit it
    settings = bench_settings(Path(args.data_dir), args.bootstrap, args.prefix)
    serde = Serde(SchemaCatalog.load(settings.schemas_dir))
    store = StateStore(settings.data_dir / "state" / PROCESSOR)
    processor = FeatureProcessor(STREAMING, StoredStates(store, EntityState))
    runner = StreamRunner(settings, serde, processor, state=store)
    deadline = time.monotonic() + 120
    try:
        while True:  # joining the group is not timed: the clocks start with the first batch of events
            if time.monotonic() > deadline:
                raise SystemExit("the feature processor got no event within 120 s")
            wall0, cpu0 = time.perf_counter(), time.process_time()
            if runner.run_once():
                break
        # The rest, until the topic is drained and the last state commit is done.
        runner.run(threading.Event(), until_caught_up=True)
        wall_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
        produced = runner.producer.delivered
    finally:
        runner.close()
    if runner.processed != args.events:
        raise SystemExit(f"processed {runner.processed} events, expected {args.events}")
    return {
        "events": runner.processed,
        "batches": runner.batches,
        "updates": produced,
        "dead_lettered": runner.consumer.dead_lettered,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "events_per_s_wall": runner.processed / wall_s,
        "events_per_s_cpu": runner.processed / cpu_s,
    }


def role_worker(args: argparse.Namespace) -> None:
    """Feature processor and online-store writer until SIGTERM (the freshness run's processors)."""
    from processors.worker import run_processors

    settings = bench_settings(Path(args.data_dir), args.bootstrap, args.prefix)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_processors(
        settings, [PROCESSOR, "online-store-writer"], stop, on_ready=lambda _: print("ready", flush=True)
    )


# --- the driver ----------------------------------------------------------------------------------


def run_json(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a measuring subprocess; its last stdout line is its JSON figures, or {'error': why}."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:  # subprocess.run kills its child on timeout
        return {"error": f"timed out after {timeout_s:.0f} s: {' '.join(cmd[:3])}"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        # The first traceback says why; shutdown noise (Faust's pending tasks) can follow it.
        first = done.stderr.find("Traceback")
        head = done.stderr[first : first + 3000] if first >= 0 else ""
        return {"error": f"exit {done.returncode}: {head}\n...\n{done.stderr[-1500:]}"}
    figures: dict[str, Any] = json.loads(lines[-1])
    return figures


def produce_clicks(settings: Settings, serde: Serde, records: list[dict[str, Any]]) -> float:
    start = time.perf_counter()
    with EventProducer(settings, serde, client_id="bench-clicks") as producer:
        for record in records:
            producer.send("clicks", record)
        producer.flush(120)
    return time.perf_counter() - start


def quix_figures(
    bootstrap: str, topic: str, *, events: int, windows_ms: list[int], workdir: Path, core: int
) -> dict[str, Any]:
    """Quix Streams in its own virtualenv, as a subprocess; {'error': why} when it cannot run."""
    setup = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "quix_env.sh")], capture_output=True, text=True, check=False
    )
    if setup.returncode != 0:
        return {"error": f"could not create Quix's virtualenv:\n{setup.stderr[-3000:]}"}
    venv = ROOT / setup.stdout.strip().splitlines()[-1]
    tag = uuid.uuid4().hex[:8]
    spec = {
        "bootstrap": bootstrap,
        "topic": topic,
        "output_topic": f"quix-out-{tag}",
        "group": f"quix-bench-{tag}",
        "state_dir": str(workdir / f"quix-state-{tag}"),
        "events": events,
        "windows_ms": windows_ms,
        "schema": SchemaCatalog.load(ROOT / "schemas" / "avro").latest("click").raw,
        "core": core,
    }
    spec_file = workdir / f"quix-{tag}.json"
    spec_file.write_text(json.dumps(spec))
    return run_json([str(venv / "bin" / "python"), str(ROOT / "benchmarks" / "quix_streaming.py"),
                     str(spec_file)], timeout_s=900)  # fmt: skip


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def freshness(
    settings: Settings, serde: Serde, rate: int, seconds: float, sample_every: int = 10
) -> dict[str, Any]:
    """Produce at a steady ``rate``; per sampled event, send -> visible in the online store (ms)."""
    from serving.online_store import open_online_store

    rng = random.Random(13)
    weights = [1 / (k + 1) ** 0.8 for k in range(USERS)]
    total = int(rate * seconds)
    users = rng.choices(range(USERS), weights=weights, k=total + 1)
    pending: dict[str, list[tuple[int, float]]] = {}  # user -> [(event time, sent at)]
    latencies: list[float] = []
    feature = [STREAMING.features[0].name]
    poll_every_s = 0.005

    def click(i: int, user: int) -> dict[str, Any]:
        return {
            "event_id": f"f{i}", "event_time": int(time.time() * 1000), "user_id": f"u{user}",
            "item_id": str(rng.randint(1, 80)), "action": "IMPRESSION", "position": rng.randint(1, 3),
            "campaign": "all", "propensity": None, "session_id": None, "user_features": {},
        }  # fmt: skip

    def check(store: Any) -> None:
        keys = list(pending)
        now = time.perf_counter()
        rows = store.get_batch(STREAMING.name, keys, feature, now_ms=int(time.time() * 1000))
        for key, row in zip(keys, rows, strict=True):
            if row.event_time_ms is None:
                continue
            waiting = pending[key]
            still = [(t, sent) for t, sent in waiting if t > row.event_time_ms]
            latencies.extend((now - sent) * 1000 for t, sent in waiting if t <= row.event_time_ms)
            if still:
                pending[key] = still
            else:
                del pending[key]

    with (
        EventProducer(settings, serde, client_id="bench-fresh") as producer,
        open_online_store(settings) as store,
    ):
        # Warm up until one event is visible: the worker has joined its groups and opened its stores.
        probe = click(-1, users[-1])
        producer.send("clicks", probe)
        producer.flush()
        pending[probe["user_id"]] = [(probe["event_time"], time.perf_counter())]
        warm_deadline = time.monotonic() + 90
        while pending and time.monotonic() < warm_deadline:
            check(store)
            time.sleep(0.01)
        if pending:
            return {"error": "the worker did not make a probe event visible within 90 s"}
        latencies.clear()
        start = time.perf_counter()
        sent = 0
        next_poll = start
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - start) * rate) + 1)  # the deadline loop: events owed by now
            while sent < due:
                record = click(sent, users[sent])
                producer.send("clicks", record)
                if sent % sample_every == 0:
                    pending.setdefault(record["user_id"], []).append(
                        (record["event_time"], time.perf_counter())
                    )
                sent += 1
            if now >= next_poll and pending:
                check(store)
                next_poll = now + poll_every_s
            time.sleep(max(0.0, min(start + (sent + 1) / rate, next_poll) - time.perf_counter()))
        produced_s = time.perf_counter() - start
        drain_deadline = time.monotonic() + 30
        while pending and time.monotonic() < drain_deadline:
            check(store)
            time.sleep(poll_every_s)
        producer.flush()
    ordered = sorted(latencies)
    missing = sum(len(v) for v in pending.values())
    if not ordered:
        return {"error": "no sampled event became visible"}
    return {
        "events": total,
        "rate": total / produced_s,
        "samples": len(ordered),
        "missing": missing,
        "p50_ms": percentile(ordered, 0.50),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": ordered[-1],
    }


def start_worker(settings: Settings, workdir: Path) -> subprocess.Popen[str]:
    log = (workdir / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "worker", "--data-dir", str(settings.data_dir),
         "--bootstrap", str(settings.bootstrap_servers), "--prefix", settings.topic_prefix],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready" once the runners are built (blocks at most until exit)
    if line.strip() != "ready":
        stop_process(proc)
        raise SystemExit(f"the worker did not start: {(workdir / 'worker.log').read_text()[-3000:]}")
    return proc


def stop_process(proc: subprocess.Popen[str], timeout_s: float = 20.0) -> None:
    """SIGTERM by pid, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(figures: dict[str, Any], args: argparse.Namespace) -> bool:
    hw, q1, q3, fr = figures["headwater"], figures["quix_1m"], figures["quix_3w"], figures["freshness"]
    print()
    print(f"streaming features, {args.events:,} click events, {USERS:,} users, one core each")
    print(f"  {'':<58} {'events/s (CPU)':>15} {'events/s (wall)':>16}")
    rows = [
        ("Headwater, Faust engine (default), count+sum x 1m/1h/24h", figures["faust"]),
        ("Headwater, native engine, the same processor", hw),
        ("Quix Streams, tumbling 1m count+sum (reference)", q1),
        ("Quix Streams, tumbling count+sum x 1m/1h/24h", q3),
    ]
    for label, f in rows:
        if "error" in f:
            print(f"  {label:<58} unavailable: {f['error'].strip().splitlines()[-1][:200]}")
        else:
            print(f"  {label:<58} {f['events_per_s_cpu']:>15,.0f} {f['events_per_s_wall']:>16,.0f}")
    ok = True
    for engine, f in (("Faust engine", figures["faust"]), ("native engine", hw)):
        if "error" in f or "error" in q1:
            print(f"throughput, {engine}: FAIL (a side did not run)")
            ok = False
            continue
        cpu_ok = f["events_per_s_cpu"] >= q1["events_per_s_cpu"]
        wall_ok = f["events_per_s_wall"] >= q1["events_per_s_wall"]
        print(
            f"throughput target, {engine}, {THROUGHPUT_TARGET_NOTE}: CPU {verdict(cpu_ok)} "
            f"({f['events_per_s_cpu'] / q1['events_per_s_cpu']:.2f}x), wall {verdict(wall_ok)} "
            f"({f['events_per_s_wall'] / q1['events_per_s_wall']:.2f}x)"
        )
        ok = ok and cpu_ok
    if "error" in fr:
        print(f"freshness: FAIL ({fr['error']})")
        return False
    fresh_ok = fr["p99_ms"] <= FRESHNESS_TARGET_MS and fr["missing"] == 0
    print(
        f"freshness at {fr['rate']:,.0f} events/s for {args.seconds:.0f} s "
        f"({fr['samples']:,} sampled events, {fr['missing']} never visible): "
        f"p50 {fr['p50_ms']:.0f} ms, p99 {fr['p99_ms']:.0f} ms, max {fr['max_ms']:.0f} ms; "
        f"target p99 <= {FRESHNESS_TARGET_MS:.0f} ms: {verdict(fresh_ok)}"
    )
    return ok and fresh_ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rate", type=int, default=5000, help="freshness: events/s produced")
    parser.add_argument("--seconds", type=float, default=20.0, help="freshness: how long to produce")
    parser.add_argument(
        "--parts",
        default="throughput,faust,quix,freshness",
        help="comma-separated: throughput, faust, quix, freshness",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    # Internal: the measured subprocesses.
    parser.add_argument("--role", choices=["headwater", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "headwater":
        print(json.dumps(role_headwater(args)))
        return 0
    if args.role == "worker":
        role_worker(args)
        return 0

    parts = set(args.parts.split(","))
    skipped = {"error": "skipped (--parts)"}
    figures: dict[str, Any] = {
        "headwater": skipped,
        "faust": skipped,
        "quix_1m": skipped,
        "quix_3w": skipped,
        "freshness": skipped,
    }
    workdir = Path(tempfile.mkdtemp(prefix="hw-streaming-"))
    broker = EmbeddedBroker(load_settings(data_dir=workdir / "broker"))
    fresh_broker = EmbeddedBroker(load_settings(data_dir=workdir / "fresh-broker"))
    worker: subprocess.Popen[str] | None = None
    try:
        info = broker.start()
        core = one_core()
        serde = Serde(SchemaCatalog.load(ROOT / "schemas" / "avro"))
        if parts & {"throughput", "faust", "quix"}:
            settings = bench_settings(workdir / "throughput", info.bootstrap)
            TopicCatalog(settings).create_all(AdminClient({"bootstrap.servers": info.bootstrap}))
            took = produce_clicks(settings, serde, clicks(args.events, USERS))
            print(f"produced {args.events:,} clicks in {took:.1f} s; measuring on core {core}", flush=True)
        if "throughput" in parts:
            figures["headwater"] = run_json(
                [sys.executable, __file__, "--role", "headwater", "--data-dir", str(settings.data_dir),
                 "--bootstrap", info.bootstrap, "--events", str(args.events), "--core", str(core)],
                timeout_s=900,
            )  # fmt: skip
            print(f"headwater: {figures['headwater']}", flush=True)
        if "faust" in parts:
            from faust_streaming import run_faust

            clicks_topic = TopicCatalog(settings).name("clicks")
            figures["faust"] = run_faust(info.bootstrap, clicks_topic, args.events, core=core)
            print(f"faust: {figures['faust']}", flush=True)
        if "quix" in parts:
            clicks_topic = TopicCatalog(settings).name("clicks")
            for key, windows in (("quix_1m", WINDOWS_MS[:1]), ("quix_3w", WINDOWS_MS)):
                figures[key] = quix_figures(
                    info.bootstrap,
                    clicks_topic,
                    events=args.events,
                    windows_ms=windows,
                    workdir=workdir,
                    core=core,
                )
                print(f"{key}: {figures[key]}", flush=True)
        if "freshness" in parts:
            # A broker of its own: the embedded broker keeps every record in memory and spends more
            # CPU per fetch the more it holds (after the 1.2M records above, ~45% more for the
            # same 5,000 events/s), which would be measured here instead of the processors.
            broker.stop()
            fresh_info = fresh_broker.start()
            fresh = bench_settings(workdir / "freshness", fresh_info.bootstrap, prefix="fresh.")
            TopicCatalog(fresh).create_all(AdminClient({"bootstrap.servers": fresh_info.bootstrap}))
            worker = start_worker(fresh, workdir)
            figures["freshness"] = freshness(fresh, serde, args.rate, args.seconds)
            print(f"freshness: {figures['freshness']}", flush=True)
    finally:
        if worker is not None:
            stop_process(worker)
        broker.stop()
        fresh_broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if report(figures, args) else 1


if __name__ == "__main__":
    sys.exit(main())
