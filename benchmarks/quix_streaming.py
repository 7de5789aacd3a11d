"""Quix Streams' side of the streaming benchmark; runs inside Quix's own virtualenv.

Driven by ``benchmarks/features_streaming.py``, which produces the click events to the
embedded broker and runs ``.venv-quix/bin/python benchmarks/quix_streaming.py SPEC.json``.
This script consumes the same topic with a Quix Streams ``Application``: it decodes each
Avro single-object-encoded click (skipping the 10-byte header, then fastavro's
``schemaless_reader``, as Headwater's serde does), takes the event time from the record,
and keeps a keyed tumbling-window count + sum(position) per window length, emitting the
current values of every window per event (``.current()``) to an output topic as JSON,
which is Quix's own default serializer. It stops after ``events`` input messages are
processed, pinned to the one core it is given, and prints one JSON object on stdout.
It imports nothing from Headwater.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader
from quixstreams import Application, __version__
from quixstreams.dataframe.windows import Count, Sum
from quixstreams.models.serializers import Deserializer

_HEADER_LEN = 10  # C3 01 + 8-byte schema fingerprint (Avro single-object encoding)


class SingleObjectAvro(Deserializer):
    """Avro single-object encoding with one known writer schema, as a Quix value deserializer."""

    def __init__(self, schema: dict[str, Any]) -> None:
        super().__init__()
        self._schema = parse_schema(schema)

    def __call__(self, value: bytes, ctx: Any) -> Any:
        body = BytesIO(value)
        body.seek(_HEADER_LEN)
        return schemaless_reader(body, self._schema, None)


def _event_time(value: Any, headers: Any, timestamp: float, timestamp_type: Any) -> int:
    return int(value["event_time"])


def main(spec_file: Path) -> dict[str, Any]:
    spec = json.loads(spec_file.read_text())
    if spec.get("core") is not None:
        os.sched_setaffinity(0, {spec["core"]})  # before any client starts a thread: they inherit it
    expected: int = spec["events"]
    progress = {"n": 0, "wall0": 0.0, "cpu0": 0.0, "wall1": 0.0, "cpu1": 0.0}
    app: Application | None = None

    def on_processed(topic: str, partition: int, offset: int) -> None:
        if progress["n"] == 0:
            progress["wall0"], progress["cpu0"] = time.perf_counter(), time.process_time()
        progress["n"] += 1
        if progress["n"] == expected:
            progress["wall1"], progress["cpu1"] = time.perf_counter(), time.process_time()
            assert app is not None
            app.stop()

    app = Application(
        broker_address=spec["bootstrap"],
        consumer_group=spec["group"],
        auto_offset_reset="earliest",
        state_dir=spec["state_dir"],
        # The embedded broker needs a short session timeout, else a group join takes ~23 s.
        consumer_extra_config={"session.timeout.ms": 6000},
        on_message_processed=on_processed,
        use_changelog_topics=spec.get("changelog", True),
        loglevel="WARNING",
    )
    source = app.topic(
        spec["topic"],
        key_deserializer="str",
        value_deserializer=SingleObjectAvro(spec["schema"]),
        timestamp_extractor=_event_time,
    )
    output = app.topic(spec["output_topic"], value_serializer="json", key_serializer="str")
    sdf = app.dataframe(source)
    for window_ms in spec["windows_ms"]:
        # One branch per window length, each a keyed tumbling count + sum of position.
        (
            sdf.tumbling_window(window_ms, name=f"w{window_ms}")
            .agg(count=Count(), position_sum=Sum("position"))
            .current()
            .to_topic(output)
        )
    started = time.perf_counter()
    app.run()
    if progress["n"] < expected:
        raise SystemExit(f"Quix stopped after {progress['n']} of {expected} events")
    wall = progress["wall1"] - progress["wall0"]
    cpu = progress["cpu1"] - progress["cpu0"]
    return {
        "version": __version__,
        "events": progress["n"],
        "wall_s": wall,
        "cpu_s": cpu,
        "events_per_s_wall": progress["n"] / wall,
        "events_per_s_cpu": progress["n"] / cpu,
        "startup_s": progress["wall0"] - started,
        "changelog": spec.get("changelog", True),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(main(Path(sys.argv[1]))))
