"""Serde and produce throughput, side by side with bare fastavro in the same run.

    .venv/bin/python benchmarks/serde.py [--events 20000] [--produce 200000]

Prints encode/decode events/s on one core for the prediction event (50 features) with
Headwater's single-object serde and with bare fastavro schemaless writer/reader on the
same records, the overhead of each, and produce throughput to the embedded broker.
Target: serde overhead <= 15% over bare fastavro.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from headwater.settings import load_settings
from streams.broker import EmbeddedBroker
from streams.catalog import SchemaCatalog
from streams.producer import EventProducer
from streams.serde import Serde
from streams.topics import TopicCatalog

ROOT = Path(__file__).resolve().parents[1]


def prediction(i: int) -> dict[str, Any]:
    return {
        "prediction_id": f"p-{i:012d}", "event_time": 1_700_000_000_000 + i, "model_name": "ctr",
        "model_version": 7, "model_ref": "ctr@production", "entity_key": f"user-{i % 10_000}",
        "client_id": "web", "score": 0.123 + i % 10 / 100, "label": None, "ranked_items": ["3", "14", "59"],
        "features": [
            {"name": f"user_activity:f{j}", "value": float(j) * 1.5 if j % 3 else j,
             "event_time": 1_700_000_000_000 - j * 1000, "defaulted": j == 7}
            for j in range(50)
        ],
        "experiment_id": "exp-1", "variant": "b", "propensity": 0.5, "latency_us": 850, "shadow": False,
        "trace_id": "0" * 32,
    }  # fmt: skip


def best_rate(fn: Callable[[], None], n: int, repeats: int = 5) -> float:
    """Events/s of the best of ``repeats`` runs (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / min(times)


def serde_figures(n: int) -> None:
    catalog = SchemaCatalog.load(ROOT / "schemas" / "avro")
    serde = Serde(catalog)
    parsed = catalog.latest("prediction").parsed
    records = [prediction(i) for i in range(n)]
    encoded = [serde.encode("prediction", r) for r in records]
    bare_encoded = [e[10:] for e in encoded]

    def hw_encode() -> None:
        for r in records:
            serde.encode("prediction", r)

    def bare_encode() -> None:
        for r in records:
            buf = BytesIO()
            schemaless_writer(buf, parsed, r)
            buf.getvalue()

    def hw_decode() -> None:
        for e in encoded:
            serde.decode(e)

    def bare_decode() -> None:
        for e in bare_encoded:
            schemaless_reader(BytesIO(e), parsed, None)

    rows = []
    for name, hw, bare in (("encode", hw_encode, bare_encode), ("decode", hw_decode, bare_decode)):
        hw_rate, bare_rate = best_rate(hw, n), best_rate(bare, n)
        rows.append((name, hw_rate, bare_rate, (bare_rate / hw_rate - 1) * 100))
    print(f"prediction event, 50 features, {len(encoded[0])} bytes; {n} events, best of 5, one core")
    print(f"{'':8}{'headwater ev/s':>16}{'bare fastavro ev/s':>20}{'overhead':>10}  target <= 15%")
    for name, hw_rate, bare_rate, overhead in rows:
        verdict = "ok" if overhead <= 15 else "MISSED"
        print(f"{name:8}{hw_rate:>16,.0f}{bare_rate:>20,.0f}{overhead:>9.1f}%  {verdict}")


def produce_figures(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp))
        broker = EmbeddedBroker(settings)
        info = broker.start()
        try:
            settings = load_settings(data_dir=Path(tmp), bootstrap_servers=info.bootstrap)
            from confluent_kafka.admin import AdminClient

            TopicCatalog(settings).create_all(AdminClient({"bootstrap.servers": info.bootstrap}))
            serde = Serde(SchemaCatalog.load(ROOT / "schemas" / "avro"))
            records = [prediction(i) for i in range(10_000)]
            rates = []
            with EventProducer(settings, serde) as producer:
                for _ in range(3):
                    start = time.perf_counter()
                    for i in range(n):
                        producer.send("predictions", records[i % len(records)])
                    producer.flush(120)
                    rates.append(n / (time.perf_counter() - start))
            print(
                f"produce to embedded broker (encode + idempotent produce + delivery reports), "
                f"{n} prediction events x3: median {statistics.median(rates):,.0f} ev/s, "
                f"best {max(rates):,.0f} ev/s"
            )
            encoded = [serde.encode("prediction", r) for r in records]
            topic = TopicCatalog(settings).name("predictions")
            raw_rates = []
            with EventProducer(settings, serde) as producer:
                for _ in range(3):
                    start = time.perf_counter()
                    for i in range(n):
                        producer.send_raw(topic, encoded[i % len(encoded)], key=b"k%d" % (i % 1000))
                    producer.flush(120)
                    raw_rates.append(n / (time.perf_counter() - start))
            print(
                f"produce pre-encoded (same {len(encoded[0])}-byte events, no Avro encode): "
                f"median {statistics.median(raw_rates):,.0f} ev/s, best {max(raw_rates):,.0f} ev/s"
            )
        finally:
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--produce", type=int, default=100_000)
    args = parser.parse_args()
    print(f"cpu count {os.cpu_count()}; python serde on one core")
    serde_figures(args.events)
    produce_figures(args.produce)


if __name__ == "__main__":
    main()
