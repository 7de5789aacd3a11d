"""Local processes started by Headwater (the embedded broker, background services): found and
stopped by their own process id, never by name, and never a recycled pid of something else."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

__all__ = ["running", "terminate"]

log = logging.getLogger(__name__)


def running(pid: int, marker: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and its command line contains ``marker``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return marker.encode() in cmdline and state != "Z"


def terminate(pid: int, marker: str, timeout_s: float) -> None:
    """SIGTERM; wait up to ``timeout_s`` for the exit (reaping our own child); then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: watch /proc instead
            done = 0 if running(pid, marker) else pid
        if done == pid:
            return
        time.sleep(0.05)
    log.warning("pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout_s)
    os.kill(pid, signal.SIGKILL)
