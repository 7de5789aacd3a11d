"""The command line's promises under hostile input, through the real broker and real processes:
one line on stderr per error with the right exit code, publish reporting bad lines and going on,
tail as a pure reader that shows only what is new, and service settings kept private."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from headwater.settings import Settings, load_settings
from infra.services import Services
from infra.stack import serving_target
from serving.server import READY_LINE
from streams.broker import free_port
from streams.consumer import EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde
from tests.test_cli import click, invoke, read_all
from tests.waiting import wait_for


def config_file(settings: Settings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return path


def headwater(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "headwater.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
    )


def assert_one_line_errors(cases: dict[tuple[str, ...], tuple[int, str]], tmp_path: Path, **env: str) -> None:
    """Run every case at once (each is a process of its own); each must fail with its exit code and
    exactly one line on stderr, ``headwater: error: ...`` containing its message."""
    procs = {args: headwater(*args, cwd=tmp_path, env=env) for args in cases}
    for args, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        code, message = cases[args]
        assert proc.returncode == code, (args, out, err)
        assert "Traceback" not in out + err, (args, err)
        lines = err.splitlines()
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith("headwater: error: ") and message in lines[0], (args, err)


def test_commands_without_a_broker_or_with_bad_arguments_fail_in_one_line(tmp_path: Path) -> None:
    empty = str(tmp_path / "nothing-running")
    existing = tmp_path / "stack"
    existing.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "broken.yaml").write_text("broker: {port: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- data_dir\n")
    cases = {
        ("--data-dir", empty, "models", "list"): (1, "no broker: run `headwater up`"),
        ("--data-dir", empty, "models", "show", "ctr_model"): (1, "no broker"),
        ("--data-dir", empty, "serve", "--port", "0", "--metrics-port", "0"): (1, "no broker"),
        ("--data-dir", empty, "sql", "SELECT count() FROM clicks"): (
            1,
            f"data directory {empty} does not exist",
        ),
        ("--data-dir", str(a_file), "sql", "SELECT 1"): (1, "is not a directory"),
        ("--data-dir", empty, "features", "list"): (1, "does not exist"),
        ("--data-dir", str(existing), "sql", "SELEC 1"): (1, "(SYNTAX_ERROR); in query: SELEC 1"),
        ("--config", "broken.yaml", "status"): (1, "broken.yaml is not valid YAML at line 2"),
        ("--config", "list.yaml", "status"): (1, "holds a list, not a mapping"),
        ("--config", str(tmp_path), "status"): (1, "is a folder"),
        ("serve", "--port", "99999"): (2, "less than or equal to 65535"),
        ("--data-dir", empty, "serve", "--host", "256.1.1.1", "--port", "0"): (
            1,
            "cannot listen on 256.1.1.1",
        ),
    }
    assert_one_line_errors(cases, tmp_path)
    # A Kafka that does not answer (a closed port): the client's own log lines stay out of it.
    closed = f"127.0.0.1:{free_port()}"
    unreachable = {
        ("--data-dir", empty, "models", "list"): (1, "cannot read topic metadata"),
        ("--data-dir", empty, "tail", "clicks"): (1, "cannot read topic metadata"),
        ("--data-dir", empty, "serve", "--port", "0", "--metrics-port", "0"): (1, "does not answer"),
        ("--data-dir", empty, "topics", "create"): (1, "is the broker up?"),
    }
    assert_one_line_errors(unreachable, tmp_path, HEADWATER_BOOTSTRAP_SERVERS=closed)


def test_serve_refuses_to_start_beside_a_running_service(settings: Settings, tmp_path: Path) -> None:
    config = config_file(settings, tmp_path / "settings.yaml")
    services = Services(settings)  # as `headwater up` starts it
    services.start("serving", ["serve"], ready=READY_LINE, timeout_s=120)
    try:
        port = int(serving_target(settings).rsplit(":", 1)[1])
        other_dir = str(tmp_path / "other")
        cases = {
            ("--config", str(config), "serve"): (1, "a prediction service is already running for data dir"),
            # Another data dir, the same port: the port is taken.
            ("--config", str(config), "--data-dir", other_dir, "serve", "--port", str(port)): (
                1,
                f"gRPC port 127.0.0.1:{port} is taken",
            ),
        }
        assert_one_line_errors(cases, tmp_path)
    finally:
        assert services.stop("serving")
    with socket.socket() as taken:  # the metrics port too, held by anything
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        args = ("--config", str(config), "serve", "--port", "0", "--metrics-port", busy)
        assert_one_line_errors({args: (1, f"metrics port 127.0.0.1:{busy} is taken")}, tmp_path)


def test_publish_reports_bad_bytes_and_oversized_lines_and_goes_on(
    settings: Settings, serde: Serde, tmp_path: Path
) -> None:
    huge = json.dumps(click("huge", user_id="u" * 1_200_000)).encode()  # over librdkafka's 1,000,000
    lines = [
        json.dumps(click("ok-1")).encode(),
        b'{"event_id": "bad-\xff\xfe", "action": "CLICK"}',
        huge,
        json.dumps(click("ok-2", user_id="u2")).encode(),
        b"\xc3(",  # a truncated two-byte sequence
        json.dumps(click("ok-3", user_id="u3")).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    result = invoke(settings, "publish", "clicks", "--file", str(path))

    assert result.exit_code == 1, result.output
    report = result.stderr.splitlines()
    assert [line.split(":")[1] for line in report] == ["2", "3", "5"], report
    assert report[0] == f"{path}:2: not UTF-8 text: byte 0xff at column {lines[1].index(0xFF) + 1}"
    assert "larger than the message limit of 1000000 bytes" in report[1]
    assert report[2] == f"{path}:5: not UTF-8 text: byte 0xc3 at column 1"
    assert "3 events published" in result.stdout and "3 invalid lines" in result.stdout
    arrived = read_all(settings, serde, "clicks", expected=3)
    assert sorted(e.record["event_id"] for e in arrived) == ["ok-1", "ok-2", "ok-3"]


def dead_letters(settings: Settings, serde: Serde) -> list[Any]:
    """Every event on dead-letters, read to its end."""
    events: list[Any] = []
    with EventConsumer(settings, serde, ["dead-letters"], name="test-dlq") as consumer:

        def read() -> bool:
            events.extend(consumer.poll(timeout_s=0.2))
            return consumer.caught_up()

        wait_for(read, 20, "dead-letters to be read to its end")
    return events


def test_tail_is_a_reader_it_never_dead_letters(
    settings: Settings, serde: Serde, caplog: pytest.LogCaptureFixture
) -> None:
    with EventProducer(settings, serde) as producer:
        producer.send("clicks", click("before"))
        name = f"{settings.topic_prefix}clicks"
        producer.send_raw(name, b"\xc3\x01 not an event", key=b"u1")
        producer.send("clicks", click("after"))
        producer.flush()

    result = invoke(settings, "tail", "clicks")

    assert result.exit_code == 0, result.output
    assert {json.loads(line)["event_id"] for line in result.stdout.splitlines()} == {"before", "after"}
    assert [r.message for r in caplog.records if "not decodable" in r.message]  # said, not dead-lettered
    assert dead_letters(settings, serde) == []


def test_tail_latest_follow_shows_only_events_produced_after_it_starts(
    settings: Settings, serde: Serde, tmp_path: Path
) -> None:
    with EventProducer(settings, serde) as producer:
        # Batches of several records: the embedded broker then lists a partition's end at the
        # start of its last batch, not after it.
        for batch in range(3):
            for i in range(20):
                producer.send("clicks", click(f"old-{batch}-{i}", user_id=f"u{i % 4}"))
            producer.flush()
    config = config_file(settings, tmp_path / "settings.yaml")
    tail = headwater("--config", str(config), "tail", "clicks", "--latest", "--follow", cwd=tmp_path)
    printed: list[str] = []
    notes: list[str] = []
    readers = [
        threading.Thread(target=lambda: printed.extend(tail.stdout or []), daemon=True),
        threading.Thread(target=lambda: notes.extend(tail.stderr or []), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        wait_for(lambda: any("following clicks" in n for n in notes), 60, "tail to reach the end")
        assert printed == []  # nothing older than the command
        new = [click(f"new-{i}", user_id=f"u{i % 4}") for i in range(8)]
        with EventProducer(settings, serde) as producer:
            for record in new:
                producer.send("clicks", record)
            producer.flush()
        wait_for(lambda: len(printed) >= len(new), 20, "tail to print the new events")
    finally:
        tail.terminate()
        code = tail.wait(10)
    assert code == 0  # SIGTERM ends a follow cleanly, like Ctrl-C
    shown = [json.loads(line)["event_id"] for line in printed]
    assert sorted(shown) == sorted(r["event_id"] for r in new)  # every new one, once, and nothing else
    assert len(notes) == 1  # the one note, no error


def test_service_settings_file_is_private_and_holds_no_secret(settings: Settings, tmp_path: Path) -> None:
    password = "s3cr3t-pw"
    port = free_port()  # nothing listens: the child fails, naming where it tried
    secret = settings.model_copy(
        update={
            "offline_store": settings.offline_store.model_copy(
                update={
                    "type": "clickhouse",
                    "clickhouse_url": f"clickhouse://default:{password}@127.0.0.1:{port}/db",
                }
            ),
            "kafka_client": {"client.rack": "rack-1", "sasl.password": password},
        }
    )
    services = Services(secret)
    path = services.settings_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(services.dir.stat().st_mode) == 0o700
    assert password not in path.read_text() and "clickhouse_url" not in path.read_text()
    # The secrets reach a child through its environment: it resolves exactly the same settings.
    env = secret.secrets_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert load_settings(path).model_dump() == secret.model_dump()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    # A real service child: it reaches for the ClickHouse URL it got only from its environment, and
    # its log names the server without the password.
    services.start("probe", ["sql", "SELECT 1"])
    log_file = services.dir / "probe.log"
    wait_for(lambda: "headwater: error:" in log_file.read_text(), 60, "the probe to fail")
    log = log_file.read_text()
    assert f"clickhouse://default:***@127.0.0.1:{port}/db" in log, log
    assert password not in log
