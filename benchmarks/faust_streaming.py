"""The Faust engine's row of the streaming benchmark: the same feature processor, hosted by Faust.

    .venv/bin/python benchmarks/faust_streaming.py [--events 20000]

Standalone, it starts an embedded broker in a temporary directory, produces ``--events``
synthetic clicks (``benchmarks/features_engine.py``'s, as ``features_streaming.py`` does) and
measures on the same topic, each in a subprocess pinned to one core: the native engine
(``features_streaming.py --role headwater``: ``StreamRunner`` + ``FeatureProcessor``) and the
Faust engine (``processors.faust.FaustHost`` + the same ``FeatureProcessor``), both for the
three-window count/sum feature set ``features_streaming.STREAMING``, with the state committed
to LMDB. Events/s of CPU time (every thread of the process: aiokafka's or librdkafka's too)
and of wall time, from the first handled batch to the last one; the Faust app's group join
and shutdown are not timed, as the native side's are not.

``run_faust(bootstrap, topic, n_events, ...)`` is the Faust side alone, for
``features_streaming.py`` to add as a row. The Faust engine needs aiokafka's lz4 codec
(``cramjam``): every Headwater producer compresses with lz4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _project_first() -> None:
    """The project on sys.path before benchmarks/, which holds modules named like its packages
    (serving.py), and benchmarks/ last, for features_streaming and features_engine (not a package)."""
    rest = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")]
    sys.path[:] = [str(ROOT), *rest, str(ROOT / "benchmarks")]


_project_first()

from features_engine import clicks  # noqa: E402
from features_streaming import (  # noqa: E402
    PROCESSOR,
    STREAMING,
    USERS,
    bench_settings,
    one_core,
    produce_clicks,
    run_json,
)

_project_first()  # features_streaming put benchmarks/ first again

from streams.catalog import SchemaCatalog  # noqa: E402
from streams.consumer import Event  # noqa: E402
from streams.serde import Serde  # noqa: E402

__all__ = ["run_faust"]


class _Timed:
    """The feature processor, noting the clocks at its first and last handled batch and commit."""

    def __init__(self, processor: Any) -> None:
        self._p = processor
        self.name, self.inputs, self.event_time_aligned = processor.name, processor.inputs, True
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] = (0.0, 0.0)

    def handle(self, events: list[Event], write_time_ms: int) -> Any:
        if events and self.first is None:
            self.first = (time.perf_counter(), time.process_time())
        effects = self._p.handle(events, write_time_ms)
        if events:
            self.last = (time.perf_counter(), time.process_time())
        return effects

    def should_flush(self, now_s: float) -> bool:
        return bool(self._p.should_flush(now_s))

    def flush_effects(self) -> None:
        self._p.flush_effects()

    def state_changes(self) -> dict[str, bytes | None]:
        changes: dict[str, bytes | None] = self._p.state_changes()
        self.last = (time.perf_counter(), time.process_time())
        return changes


def role_faust(args: argparse.Namespace) -> dict[str, Any]:
    """The Faust-hosted feature processor on ``args.events`` events already in the topic."""
    from features.engine import EntityState
    from processors.faust import FaustHost
    from processors.features import FeatureProcessor
    from processors.state_store import StateStore, StoredStates

    if args.core is not None:
        os.sched_setaffinity(0, {args.core})  # before the clients start their threads
    settings = bench_settings(Path(args.data_dir), args.bootstrap, args.prefix)
    serde = Serde(SchemaCatalog.load(settings.schemas_dir))
    store = StateStore(settings.data_dir / "state" / PROCESSOR)
    timed = _Timed(FeatureProcessor(STREAMING, StoredStates(store, EntityState)))
    host = FaustHost(settings, serde, timed, state=store)
    try:
        host.run(threading.Event(), until_caught_up=True)
        produced = host.producer.delivered
    finally:
        host.close()
    if host.processed != args.events or timed.first is None:
        raise SystemExit(f"processed {host.processed} events, expected {args.events}")
    wall_s, cpu_s = timed.last[0] - timed.first[0], timed.last[1] - timed.first[1]
    return {
        "engine": "faust",
        "events": host.processed,
        "batches": host.batches,
        "updates": produced,
        "dead_lettered": host.dead_lettered,
        "paused_partitions": host.pauses,  # the aligner's flow control: partitions paused in the run
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "events_per_s_wall": host.processed / wall_s,
        "events_per_s_cpu": host.processed / cpu_s,
    }


def run_faust(
    bootstrap: str,
    topic: str,
    n_events: int,
    *,
    data_dir: Path | None = None,
    core: int | None = None,
    timeout_s: float = 900,
) -> dict[str, Any]:
    """Figures of the Faust-hosted feature processor on ``n_events`` already in ``topic`` (physical
    name of a ``clicks`` topic: its prefix is taken as the topic prefix), in a subprocess pinned to
    ``core`` (default: ``features_streaming.one_core()``); {'error': why} when it cannot run.

    ``data_dir`` must not hold another engine's state for this processor (it would resume there):
    by default a temporary directory, removed afterwards.
    """
    if not topic.endswith("clicks"):
        raise ValueError(f"{topic!r} is not a clicks topic")
    workdir = Path(tempfile.mkdtemp(prefix="hw-faust-")) if data_dir is None else data_dir
    try:
        return run_json(
            [sys.executable, __file__, "--role", "faust", "--data-dir", str(workdir),
             "--bootstrap", bootstrap, "--prefix", topic[: -len("clicks")], "--events", str(n_events),
             "--core", str(one_core() if core is None else core)],
            timeout_s=timeout_s,
        )  # fmt: skip
    finally:
        if data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--role", choices=["faust"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "faust":
        print(json.dumps(role_faust(args)))
        return 0

    from confluent_kafka.admin import AdminClient

    from headwater.settings import load_settings
    from streams.broker import EmbeddedBroker
    from streams.topics import TopicCatalog

    workdir = Path(tempfile.mkdtemp(prefix="hw-faust-streaming-"))
    broker = EmbeddedBroker(load_settings(data_dir=workdir / "broker"))
    try:
        info = broker.start()
        core = one_core()
        settings = bench_settings(workdir / "native", info.bootstrap)
        TopicCatalog(settings).create_all(AdminClient({"bootstrap.servers": info.bootstrap}))
        serde = Serde(SchemaCatalog.load(ROOT / "schemas" / "avro"))
        took = produce_clicks(settings, serde, clicks(args.events, USERS))
        print(f"produced {args.events:,} clicks in {took:.1f} s; measuring on core {core}", flush=True)
        native = run_json(
            [sys.executable, str(ROOT / "benchmarks" / "features_streaming.py"), "--role", "headwater",
             "--data-dir", str(settings.data_dir), "--bootstrap", info.bootstrap,
             "--events", str(args.events), "--core", str(core)],
            timeout_s=900,
        )  # fmt: skip
        print(f"native: {native}", flush=True)
        faust = run_faust(info.bootstrap, TopicCatalog(settings).name("clicks"), args.events, core=core)
        print(f"faust: {faust}", flush=True)
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"streaming features, {args.events:,} click events, {USERS:,} users, one core each")
    print(f"  {'':<52} {'events/s (CPU)':>15} {'events/s (wall)':>16}")
    for label, f in (
        ("native engine (StreamRunner, librdkafka)", native),
        ("Faust engine (FaustHost, aiokafka)", faust),
    ):
        if "error" in f:
            print(f"  {label:<52} unavailable: {f['error'].strip().splitlines()[-1][:200]}")
        else:
            print(f"  {label:<52} {f['events_per_s_cpu']:>15,.0f} {f['events_per_s_wall']:>16,.0f}")
    if "error" not in native and "error" not in faust:
        ratio = native["events_per_s_cpu"] / faust["events_per_s_cpu"]
        print(f"native / Faust per core: {ratio:.1f}x")
    return 0 if "error" not in native and "error" not in faust else 1


if __name__ == "__main__":
    sys.exit(main())
