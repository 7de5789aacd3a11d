"""No single record stops stream processing: poison pills mid-stream, on both engines.

Real broker, every processor of ``headwater process`` running (feature processors, online-store
writer, lake sink), the real clickstream sample. Between valid clicks go one of each kind of bad
record: over the message limit, an ``int`` beyond 32 bits, a ``double`` written where the schema
has an ``int``, bytes after the record, bytes that are no Avro, an unknown schema fingerprint, a
record the lake sink cannot store (a key that is not text) and one the online store refuses (an
item id longer than LMDB's keys). Every valid click is processed (feature values checked
against a brute-force count over the valid clicks, the lake holds them), each bad record is in
``dead-letters`` with its reason (the oversized one cut, with its size and SHA-256), and the
processors are still running afterwards.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from io import BytesIO
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from features.windows import DAY, HOUR, MINUTE, SECOND
from headwater.settings import Settings
from processors.worker import run_processors
from streams.kafka import message_limit
from streams.producer import EventProducer
from streams.serde import MAGIC, DecodeError, EncodeError, Serde
from streams.topics import TopicCatalog
from tests.processors.test_faust_engine import engine, read_all
from tests.processors.test_feature_processors import clickstream  # noqa: F401 - a fixture
from tests.processors.test_isolation import lake_ids, statuses
from tests.waiting import wait_for

# Window length -> tile size, as features/windows.py documents them (written out independently).
WINDOWS = {
    "5m": (5 * MINUTE, 5 * SECOND),
    "1h": (HOUR, MINUTE),
    "24h": (DAY, 10 * MINUTE),
    "7d": (7 * DAY, HOUR),
}
USER_WINDOWS, ITEM_WINDOWS = ["5m", "1h", "24h", "7d"], ["1h", "24h", "7d"]
FEATURE_SETS = {"user_activity": ("user_id", USER_WINDOWS), "item_activity": ("item_id", ITEM_WINDOWS)}
LONG_ITEM = "i" * 600  # a valid click; LMDB keys hold 511 bytes: the online store refuses its update


def lenient_bytes(serde: Serde, record: dict[str, Any], **retype: str) -> bytes:
    """A click as a lenient writer puts it on the wire: click v2's fingerprint over a body written
    with some fields retyped (``position="long"``: any 64-bit value; ``"double"``: 8 bytes)."""
    sv = serde.writer_schema("click")
    raw = json.loads(json.dumps(sv.raw))
    for f in raw["fields"]:
        f["type"] = retype.get(f["name"], f["type"])
    buf = BytesIO()
    schemaless_writer(buf, parse_schema(raw), record)
    return MAGIC + sv.fingerprint + buf.getvalue()


def publish_with_poison(settings: Settings, serde: Serde, clicks: list[dict[str, Any]]) -> dict[str, Any]:
    """The clicks, with a bad record after every ``len(clicks) // 9`` of them; what was sent."""
    topic = TopicCatalog(settings).name("clicks")
    step = len(clicks) // 9
    template = clicks[0]
    oversized_click = {**template, "event_id": "oversized", "user_features": {"blob": "x" * 1_500_000}}
    oversized = serde.encode("click", oversized_click)
    trailing = serde.encode("click", {**template, "event_id": "trailing"}) + b"\x00\x02"
    body = serde.encode("click", {**template, "event_id": "unknown-fingerprint"})[10:]
    bad: list[tuple[str, bytes, bytes]] = [  # (what, key, value)
        ("oversized", b"u-big", oversized),
        (
            "int beyond 32 bits",
            b"u-int",
            lenient_bytes(serde, {**template, "position": 2**40}, position="long"),
        ),
        (
            "double for an int",
            b"u-dbl",
            lenient_bytes(serde, {**template, "position": 1.5}, position="double"),
        ),
        ("trailing bytes", b"u-trail", trailing),
        ("not avro", b"u-garbage", b"\x00not an avro event"),
        ("unknown fingerprint", b"u-fp", MAGIC + b"\x01" * 8 + body),
        ("key not text", b"\xff\xfe\xfd", serde.encode("click", {**clicks[step * 7], "event_id": "bad-key"})),
    ]
    assert len(oversized) > message_limit(settings)
    for _, _, value in bad[1:6]:  # each really is undecodable, as a reader sees it
        with pytest.raises(DecodeError):
            serde.decode(value, "click")
    # The serde refuses out-of-range values and floats for integers at publish: a producer of
    # ours cannot write the two above; a lenient one in another language can.
    for value in (2**40, 1.5):
        with pytest.raises(EncodeError, match="position"):
            serde.encode("click", {**template, "position": value})
    long_item = {**clicks[step * 8], "event_id": "long-item", "item_id": LONG_ITEM}
    valid = list(clicks)
    with EventProducer(settings, serde, config={"message.max.bytes": 10_000_000}) as producer:
        for i, record in enumerate(clicks):
            producer.send("clicks", record)
            if i % step == step - 1 and i // step < len(bad):
                what, key, value = bad[i // step]
                producer.send_raw(topic, value, key=key, partition=i % 3)
                if what == "key not text":
                    valid.append(serde.decode(value)[1])
            if i == step * 8:
                producer.send("clicks", long_item)
                valid.append(long_item)
        producer.flush()
    return {"valid": valid, "bad": bad, "oversized": oversized}


def brute_force(clicks: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (feature set, entity): windowed counts and the mean position at the entity's latest
    event, counted event by event (window [start of the tile n - 1 tiles before t's, t])."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for fs, (entity, windows) in FEATURE_SETS.items():
        per: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for c in clicks:
            per[c[entity]].append(c)
        for key, events in per.items():
            t = max(e["event_time"] for e in events)
            values: dict[str, Any] = {}
            for w in windows:
                length, tile = WINDOWS[w]
                start = (t // tile - length // tile + 1) * tile
                inside = [e for e in events if start <= e["event_time"] <= t]
                values[f"impressions_{w}"] = sum(e["action"] == "IMPRESSION" for e in inside)
                values[f"clicks_{w}"] = sum(e["action"] == "CLICK" for e in inside)
                if w == "24h":
                    positions = [e["position"] for e in inside if e["action"] == "IMPRESSION"]
                    values["mean_position_24h"] = sum(positions) / len(positions) if positions else None
            out[(fs, key)] = values
    return out


def updates(settings: Settings, serde: Serde) -> list[dict[str, Any]]:
    return read_all(settings, serde, "feature-updates")


@pytest.mark.parametrize("kind", ["native", "faust"])
def test_poison_pills_are_dead_lettered_and_processing_goes_on(
    settings: Settings,
    serde: Serde,
    clickstream: list[dict[str, Any]],  # noqa: F811 - the fixture
    kind: str,
) -> None:
    s = engine(settings, kind, kind)
    sent = publish_with_poison(s, serde, clickstream[1000:1900])
    valid: list[dict[str, Any]] = sent["valid"]
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            run_processors(s, None, stop)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, name=f"poison-{kind}", daemon=True)
    thread.start()
    try:
        # 6 undecodable or oversized records x 3 readers of clicks, the key by the lake sink,
        # the long item's update by the online-store writer.
        wait_for(lambda: len(read_all(s, serde, "dead-letters")) >= 20, timeout_s=120, what="dead letters")
        wait_for(
            lambda: len(lake_ids(s, serde, "clicks")) >= len(valid) - 1,
            timeout_s=60,
            what="the lake to archive",
        )
        assert thread.is_alive() and not failures, failures
        assert {n: st["state"] for n, st in statuses(s).items()} == dict.fromkeys(
            ["features-user_activity", "features-item_activity", "online-store-writer", "lake-sink"],
            "running",
        )
        # Still running: a valid click after all that is processed too.
        after = {
            **valid[0],
            "event_id": "after-the-poison",
            "event_time": max(c["event_time"] for c in valid),
        }
        with EventProducer(s, serde) as producer:
            producer.send("clicks", after)
            producer.flush()
        valid.append(after)
        wait_for(
            lambda: "after-the-poison" in lake_ids(s, serde, "clicks"), timeout_s=60, what="the click after"
        )
        mark = ("user_activity", after["user_id"], after["event_time"])
        wait_for(
            lambda: mark in {(u["feature_set"], u["entity_key"], u["event_time"]) for u in updates(s, serde)},
            timeout_s=60,
            what="the update of the click after",
        )
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert not failures, failures

    letters = read_all(s, serde, "dead-letters")
    by_reader: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for letter in letters:
        by_reader[letter["consumer"]].append(letter)
    values = {what: value for what, _, value in sent["bad"]}
    for reader in ("features-user_activity", "features-item_activity", "lake-sink"):
        got = sorted((d["error_type"], d["original_value_sha256"]) for d in by_reader[reader])
        expected = [("OversizedRecordError", values["oversized"])] + [
            ("DecodeError", values[w])
            for w in (
                "int beyond 32 bits",
                "double for an int",
                "trailing bytes",
                "not avro",
                "unknown fingerprint",
            )
        ]
        if reader == "lake-sink":
            expected.append(("UnicodeDecodeError", values["key not text"]))
        assert got == sorted((e, hashlib.sha256(v).hexdigest()) for e, v in expected), reader
    reasons = {d["original_value_sha256"]: d["error"] for d in by_reader["lake-sink"]}
    sha = {w: hashlib.sha256(v).hexdigest() for w, v in values.items()}
    assert "out of range for an Avro int" in reasons[sha["int beyond 32 bits"]]
    assert "after the end of its record" in reasons[sha["trailing bytes"]]
    assert "unknown schema fingerprint" in reasons[sha["unknown fingerprint"]]
    assert "over the message limit" in reasons[sha["oversized"]]
    for letter in letters:  # the oversized one cut to fit, with its size and digest; the others whole
        big = letter["original_value_size"] == len(values["oversized"])
        assert letter["truncated"] == big
        if big:
            assert len(letter["original_value"]) < message_limit(s) < letter["original_value_size"]
            assert values["oversized"].startswith(letter["original_value"])
        elif letter["source_topic"].endswith("clicks"):
            assert letter["original_value"] in values.values()
    (refused,) = by_reader["online-store-writer"]
    assert refused["source_topic"] == TopicCatalog(s).name("feature-updates")
    assert refused["error_type"] == "OnlineStoreError" and "LMDB allows 511" in refused["error"]
    assert serde.decode(refused["original_value"])[1]["entity_key"] == LONG_ITEM

    # Every valid click counted, compared with a brute-force count; latest update per entity.
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for u in updates(s, serde):
        latest[(u["feature_set"], u["entity_key"])] = u["values"]
    expected = brute_force(valid)
    assert set(latest) == set(expected)
    for key, values_expected in expected.items():
        assert {k: latest[key][k] for k in values_expected} == pytest.approx(values_expected), key
    assert ("item_activity", LONG_ITEM) in latest  # computed; only the online store refused it
    # The lake holds every valid click but the one whose key it cannot store.
    in_lake = lake_ids(s, serde, "clicks")
    assert sorted(in_lake) == sorted(c["event_id"] for c in valid if c["event_id"] != "bad-key")
