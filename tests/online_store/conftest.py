"""Backends for the online-store contract suite: every one that is reachable.

LMDB runs in a temporary directory. Redis is a real ``redis-server`` started for the session
on a free port, without persistence, and stopped by its own pid; a missing ``redis-server``
fails the suite (never skips). Aerospike cannot be installed here: its tests run only when
``HEADWATER_TEST_AEROSPIKE_HOSTS`` names a server, and are skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from headwater.settings import Settings, load_settings
from serving.online_store import OnlineStore, open_online_store

BACKENDS = ["lmdb", "redis", "aerospike"]
START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the session (no RDB, no AOF), stopped by its own pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: run `make setup` (as root) or `apt-get install -y redis-server`",
            pytrace=False,
        )
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # Redis logs a line when it accepts connections: wait for it (no polling), and keep
    # draining the pipe afterwards so the server never blocks on its own log.
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            log.append(line)
            if "Ready to accept connections" in line:
                ready.set()
        ready.set()  # the server exited: stop waiting

    threading.Thread(target=drain, name="redis-log", daemon=True).start()
    try:
        if not ready.wait(START_TIMEOUT_S) or proc.poll() is not None or not _ping(port):
            pytest.fail(f"redis-server did not start on port {port}:\n{''.join(log)}", pytrace=False)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def aerospike_config() -> dict[str, Any]:
    """Where the Aerospike contract tests run; the only place the suite reads the environment."""
    hosts = os.environ.get("HEADWATER_TEST_AEROSPIKE_HOSTS")
    if not hosts:
        pytest.skip(
            "no Aerospike server is reachable (none can be installed here): set "
            "HEADWATER_TEST_AEROSPIKE_HOSTS=host:port (and optionally HEADWATER_TEST_AEROSPIKE_NAMESPACE, "
            "default 'test') to run the online-store contract suite against one"
        )
    return {
        "type": "aerospike",
        "aerospike_hosts": hosts,
        "aerospike_namespace": os.environ.get("HEADWATER_TEST_AEROSPIKE_NAMESPACE", "test"),
    }


@pytest.fixture(params=BACKENDS)
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings selecting one backend; feature set names are unique per test (see ``fs``)."""
    backend: str = request.param
    if backend == "lmdb":
        online: dict[str, Any] = {"type": "lmdb", "path": tmp_path / "online", "map_size_mb": 64}
    elif backend == "redis":
        online = {"type": "redis", "redis_url": request.getfixturevalue("redis_url")}
    else:
        online = request.getfixturevalue("aerospike_config")
    return load_settings(data_dir=tmp_path / "data", online_store=online)


@pytest.fixture()
def store(store_settings: Settings) -> Iterator[OnlineStore]:
    with open_online_store(store_settings) as opened:
        yield opened


@pytest.fixture()
def fs() -> str:
    """A feature set name of this test alone: Redis and Aerospike are shared by the session."""
    return f"fs_{uuid.uuid4().hex[:12]}"
