"""The `headwater` command line, through the real embedded broker.

Commands run in-process with typer's CliRunner (settings passed as the context object, so
they use the session broker and the test's topic prefix); error handling of the console
entry point runs as real subprocesses, since it lives in ``main()``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

from headwater.cli import app
from headwater.settings import Settings, load_settings
from infra.services import Services
from streams.broker import EmbeddedBroker
from streams.catalog import SchemaCatalog
from streams.consumer import Event, EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde

runner = CliRunner()
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "avro"


def click(event_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "event_id": event_id, "event_time": 1_574_553_634_762, "user_id": "u1", "item_id": "14",
        "action": "IMPRESSION", "position": 3, "campaign": "all", "propensity": 0.0125,
        **changes,
    }  # fmt: skip


def invoke(settings: Settings | None, *args: str) -> Result:
    return runner.invoke(app, list(args), obj=settings)


def read_all(
    settings: Settings, serde: Serde, topic: str, expected: int, timeout_s: float = 20.0
) -> list[Event]:
    """Every event of a topic, once at least ``expected`` arrived and the consumer caught up."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout_s
    with EventConsumer(settings, serde, [topic], name="test-reader") as consumer:
        while not (len(events) >= expected and consumer.caught_up()):
            assert time.monotonic() < deadline, f"only {len(events)} of {expected} events on {topic}"
            events += consumer.poll(timeout_s=0.5)
    return events


def test_publish_produces_valid_lines_and_reports_invalid_ones(
    settings: Settings, serde: Serde, tmp_path: Path
) -> None:
    lines = [
        json.dumps(click("ok-1")),
        json.dumps(click("bad-enum", action="BUY")),
        "{not json",
        "",  # blank lines are skipped, and still counted
        json.dumps(click("ok-2", user_id="u2", user_features={"segment": "a"})),
        json.dumps({k: v for k, v in click("no-user").items() if k != "user_id"}),
        json.dumps(click("typo", campain="all")),
        "[1, 2]",
        json.dumps(click("ok-3", action="CLICK")),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = invoke(settings, "publish", "clicks", "--file", str(path))

    assert result.exit_code == 1, result.output
    assert "3 events published" in result.stdout and "5 invalid lines" in result.stdout
    report = result.stderr.splitlines()
    assert [line.split(":")[1] for line in report] == ["2", "3", "6", "7", "8"]
    assert "BUY" in report[0]
    assert "not valid JSON" in report[1]
    assert "user_id" in report[2]
    assert "unknown fields campain" in report[3]
    assert "expected a JSON object" in report[4]
    arrived = read_all(settings, serde, "clicks", expected=3)
    assert sorted(e.record["event_id"] for e in arrived) == ["ok-1", "ok-2", "ok-3"]
    by_id = {e.record["event_id"]: e for e in arrived}
    assert by_id["ok-2"].key == b"u2" and by_id["ok-2"].record["user_features"] == {"segment": "a"}
    assert by_id["ok-3"].record["action"] == "CLICK"


def test_publish_of_valid_lines_exits_zero_and_tail_prints_them(settings: Settings, tmp_path: Path) -> None:
    records = [click(f"e{i}", user_id=f"u{i % 3}", position=1 + i % 3) for i in range(6)]
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    published = invoke(settings, "publish", "clicks", "-f", str(path))
    assert published.exit_code == 0, published.output
    assert "6 events published" in published.stdout

    tailed = invoke(settings, "tail", "clicks")

    assert tailed.exit_code == 0, tailed.output
    printed = [json.loads(line) for line in tailed.stdout.splitlines()]
    # Decoded with the latest click schema: v2 fields appear with their defaults.
    expected = {r["event_id"]: {**r, "session_id": None, "user_features": {}} for r in records}
    assert {p["event_id"]: p for p in printed} == expected

    limited = invoke(settings, "tail", "clicks", "--limit", "2", "--meta")
    assert limited.exit_code == 0, limited.output
    wrapped = [json.loads(line) for line in limited.stdout.splitlines()]
    assert len(wrapped) == 2
    for w in wrapped:
        assert w["topic"] == "clicks" and w["event_type"] == "click"
        assert w["key"] == w["record"]["user_id"] and w["headers"]["event_type"] == "click"
        assert isinstance(w["partition"], int) and isinstance(w["offset"], int)


def test_tail_prints_bytes_as_base64(settings: Settings, serde: Serde) -> None:
    with EventProducer(settings, serde) as producer:
        producer.send(
            "dead-letters",
            {
                "event_id": "x/0/1", "event_time": 1, "source_topic": "x", "source_partition": 0,
                "source_offset": 1, "consumer": "test", "error_type": "DecodeError", "error": "bad",
                "original_key": None, "original_value": b"\xff\x00garbage", "original_headers": {},
            },
        )  # fmt: skip
        producer.flush()
    result = invoke(settings, "tail", "dead-letters")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["original_value"] == "/wBnYXJiYWdl"


def test_schemas_check_accepts_the_catalog_and_rejects_an_incompatible_version(
    settings: Settings, catalog: SchemaCatalog, tmp_path: Path
) -> None:
    ok = invoke(settings, "schemas", "check")
    assert ok.exit_code == 0, ok.output
    assert f"{sum(1 for _ in catalog)} schemas, all compatible" in ok.stdout

    bad_dir = tmp_path / "schemas"
    bad_dir.mkdir()
    for name in ("click.v1.avsc", "outcome.v1.avsc"):
        shutil.copy(SCHEMAS / name, bad_dir / name)
    v2 = json.loads((SCHEMAS / "outcome.v1.avsc").read_text())
    v2["fields"].append({"name": "currency", "type": "string", "doc": "required, no default"})
    (bad_dir / "outcome.v2.avsc").write_text(json.dumps(v2))

    bad = invoke(settings, "schemas", "check", "--dir", str(bad_dir))

    assert bad.exit_code == 1, bad.output
    problems = [line for line in bad.stdout.splitlines() if line.startswith("outcome:")]
    assert problems and all("currency" in p for p in problems)
    assert "outcome: v2 readers cannot read v1 records" in bad.stdout
    assert "3 schemas, 1 incompatible pairs" in bad.stdout


def test_schemas_list_shows_every_version_with_its_fingerprint(
    settings: Settings, catalog: SchemaCatalog
) -> None:
    result = invoke(settings, "schemas", "list")
    assert result.exit_code == 0, result.output
    for sv in catalog:
        assert sv.fingerprint.hex() in result.stdout


def test_topics_list_shows_the_catalog_on_the_broker(settings: Settings) -> None:
    result = invoke(settings, "topics", "list")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if f"{settings.topic_prefix}clicks" in line]
    assert len(rows) == 1 and "click" in rows[0] and "yes" in rows[0]
    created = invoke(settings, "topics", "create")
    assert created.exit_code == 0 and "0 topics created, 11 already there" in created.stdout


def test_up_status_down_manage_a_broker_in_its_data_dir(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "hw")
    try:
        down = invoke(None, "--data-dir", data_dir, "status")
        assert down.exit_code == 1 and "not running" in down.stdout

        up = invoke(None, "--data-dir", data_dir, "up")
        assert up.exit_code == 0, up.output
        assert "embedded broker started" in up.stdout and "11 created" in up.stdout
        info = EmbeddedBroker(load_settings(data_dir=Path(data_dir))).info()
        assert info is not None and info.bootstrap in up.stdout

        status = invoke(None, "--data-dir", data_dir, "status")
        assert status.exit_code == 0, status.output
        assert f"pid {info.pid}" in status.stdout and "11/11 Headwater topics" in status.stdout

        again = invoke(None, "--data-dir", data_dir, "up")
        assert again.exit_code == 0 and "already running" in again.stdout

        stopped = invoke(None, "--data-dir", data_dir, "down")
        assert stopped.exit_code == 0 and f"stopped (pid {info.pid})" in stopped.stdout
        after = invoke(None, "--data-dir", data_dir, "status")
        assert after.exit_code == 1 and "not running" in after.stdout
    finally:
        EmbeddedBroker(load_settings(data_dir=Path(data_dir))).stop()


def test_demo_publishes_the_clickstream_and_reads_it_back(settings: Settings) -> None:
    result = invoke(settings, "demo", "--limit", "400", "--campaign", "men")
    assert result.exit_code == 0, result.output
    assert "400 events delivered" in result.stdout
    assert "400 events read back" in result.stdout and "0 duplicates" in result.stdout
    # It stops the processors it started, and leaves the session broker (not its own) running.
    assert "stopped processors" in result.stdout
    assert "nothing else to stop: the demo did not start Kafka" in result.stdout
    assert Services(settings).all() == []
    assert "demo complete" in result.stdout


def test_errors_are_one_line_on_stderr_without_traceback(tmp_path: Path) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text("{}\n")
    empty = str(tmp_path / "nothing-running")
    cases = {
        ("--data-dir", empty, "publish", "nosuch", "-f", str(events)): (1, "unknown topic 'nosuch'"),
        ("--data-dir", empty, "publish", "clicks", "-f", str(events)): (1, "no broker: run `headwater up`"),
        ("--data-dir", empty, "tail", "clicks"): (1, "no broker"),
        ("--config", str(tmp_path / "missing.yaml"), "status"): (1, "missing.yaml does not exist"),
        ("--bogus",): (2, "No such option: --bogus"),
        ("publish", "clicks"): (2, "Missing option '--file'"),
        ("tail", "clicks", "--limit", "zero"): (2, "'--limit'"),
        ("demo", "--campaign", "kids"): (2, "unknown campaign 'kids'"),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    procs = {
        args: subprocess.Popen(
            [sys.executable, "-m", "headwater.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for args in cases
    }
    for args, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        code, message = cases[args]
        assert proc.returncode == code, (args, out, err)
        assert "Traceback" not in out + err, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith("headwater: error: ") and message in lines[0], (args, err)
