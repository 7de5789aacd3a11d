"""Background services of the local stack: started detached, found by pid file, stopped by pid.

Each service is one command run in its own session with its log under ``<data_dir>/run``.
The settings of the starting process are handed to the child as a YAML file, so a service
sees exactly the configuration of the ``headwater up`` that started it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from headwater.errors import HeadwaterError
from headwater.files import atomic_write
from headwater.processes import running, terminate
from headwater.settings import ENV_PREFIX, Settings

__all__ = ["ServiceInfo", "Services"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    pid: int
    log_file: str
    started_at: float
    argv: list[str]


_MARKER = "headwater.cli"  # in the command line of every service


class Services:
    """Start, list and stop the background services of one data directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.state_dir

    def _state_file(self, name: str) -> Path:
        return self.dir / f"service-{name}.json"

    def settings_file(self) -> Path:
        """The settings of this stack as YAML, for children started with ``--config``: readable by
        its owner only, and without the secrets (children get those in their environment)."""
        path = self.dir / "settings.yaml"
        self._make_dir()
        data = self.settings.dump_without_secrets()
        atomic_write(path, yaml.safe_dump(data, sort_keys=True).encode(), mode=0o600)
        os.chmod(path, 0o600)  # a file of an older version may have had the umask's mode
        return path

    def _make_dir(self) -> None:
        # Pid files, logs and the settings of running services: the owner's business only.
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.chmod(0o700)  # made earlier by the broker, with the umask's mode

    def _child_env(self) -> dict[str, str]:
        """The child's environment: this one without HEADWATER_* variables (its settings are the
        file's, exactly this process's, where a variable would override what --data-dir or
        --config chose here), plus the secrets, which the file leaves out."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        return {**env, **self.settings.secrets_env()}

    def start(
        self, name: str, args: list[str], *, ready: str | None = None, timeout_s: float = 30.0
    ) -> ServiceInfo:
        """Start ``headwater --config <settings> ARGS`` in the background unless it runs already.

        With ``ready``, wait until that text appears in the service's log (it failed if it exits first).
        """
        running = self.info(name)
        if running is not None:
            return running
        log_file = self.dir / f"{name}.log"
        argv = [sys.executable, "-m", "headwater.cli", "--config", str(self.settings_file()), *args]
        start = log_file.stat().st_size if log_file.exists() else 0
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self._child_env(),
            )
        info = ServiceInfo(name, proc.pid, str(log_file), time.time(), argv)
        self._state_file(name).write_text(json.dumps(asdict(info)))
        if ready is not None:
            deadline = time.monotonic() + timeout_s
            while True:
                with log_file.open("rb") as f:
                    f.seek(start)
                    if ready.encode() in f.read():
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    terminate(proc.pid, _MARKER, 5.0)
                    self._state_file(name).unlink(missing_ok=True)
                    text = log_file.read_bytes()[start:].decode(errors="replace")
                    lines = text.strip().splitlines() or ["(nothing)"]
                    raise HeadwaterError(
                        f"service {name} did not start; its log {log_file} ends with: {lines[-1][-500:]}"
                    )
                time.sleep(0.05)
        log.info("service %s started, pid %d", name, proc.pid)
        return info

    def info(self, name: str) -> ServiceInfo | None:
        try:
            info = ServiceInfo(**json.loads(self._state_file(name).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if running(info.pid, _MARKER):
            return info
        self._state_file(name).unlink(missing_ok=True)
        return None

    def all(self) -> list[ServiceInfo]:
        names = sorted(p.name[len("service-") : -len(".json")] for p in self.dir.glob("service-*.json"))
        return [i for i in (self.info(n) for n in names) if i is not None]

    def stop(self, name: str, timeout_s: float = 15.0) -> bool:
        info = self.info(name)
        if info is None:
            return False
        terminate(info.pid, _MARKER, timeout_s)
        self._state_file(name).unlink(missing_ok=True)
        return True
