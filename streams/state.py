"""Compacted-topic state: read a compacted topic to its end, then follow it.

The registry (``models``), experiment definitions (``experiments``) and bandit state
(``bandit-state``) are rebuilt this way by every service: read from the start into the
latest value per key, report when caught up, then apply changes as they arrive and call
the change callbacks, so a promotion or an experiment stop reaches every replica in
seconds with no polling of a database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from headwater.errors import HeadwaterError
from headwater.settings import Settings
from streams.consumer import Event, EventConsumer
from streams.serde import Serde

__all__ = ["ChangeCallback", "CompactedState"]

log = logging.getLogger(__name__)

#: Called with (key, new record or None for a deletion, the event).
ChangeCallback = Callable[[str, dict[str, Any] | None, Event], None]


class CompactedState:
    """Latest record per key of one compacted topic, kept current by a background thread."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        topic: str,
        *,
        on_change: ChangeCallback | None = None,
        poll_timeout_s: float = 0.2,
    ) -> None:
        self._settings = settings
        self._serde = serde
        self.topic = topic
        self._callbacks: list[ChangeCallback] = [on_change] if on_change else []
        self._values: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._poll_timeout_s = poll_timeout_s

    def on_change(self, callback: ChangeCallback) -> None:
        self._callbacks.append(callback)

    def start(self) -> CompactedState:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"state-{self.topic}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with EventConsumer(
                self._settings, self._serde, [self.topic], name=f"state-{self.topic}", include_tombstones=True
            ) as consumer:
                while not self._stop.is_set():
                    for event in consumer.poll(500, self._poll_timeout_s):
                        self._apply(event)
                    if consumer.caught_up() and not self._caught_up.is_set():
                        log.info("state of %s caught up: %d keys", self.topic, len(self._values))
                        self._caught_up.set()
        except BaseException as exc:  # surfaced to callers of wait/get, never lost in the thread
            if not self._caught_up.is_set():
                # Whoever waits for the catch-up raises it with its message: a log line would say
                # it twice (a CLI command's error would no longer be one line).
                log.debug("state reader of %s failed before catching up", self.topic, exc_info=True)
            elif isinstance(exc, HeadwaterError):
                log.error("state reader of %s failed: %s", self.topic, exc)
            else:
                log.exception("state reader of %s failed", self.topic)
            self._error = exc
            self._caught_up.set()

    def _apply(self, event: Event) -> None:
        if event.key is None:
            log.warning("%s [%d] @%d has no key; ignored", self.topic, event.partition, event.offset)
            return
        key = event.key.decode()
        record = None if event.tombstone else event.record
        with self._lock:
            if record is None:
                self._values.pop(key, None)
            else:
                self._values[key] = record
        for callback in self._callbacks:
            try:
                callback(key, record, event)
            except Exception:  # one failing subscriber must not stop the state from following
                log.exception("change callback on %s failed for key %s", self.topic, key)

    def wait_until_caught_up(self, timeout_s: float = 30.0) -> CompactedState:
        """Block until the whole topic has been read once; raise on timeout or reader failure."""
        if not self._caught_up.wait(timeout_s):
            raise HeadwaterError(
                f"state of {self.topic} not caught up within {timeout_s}s: is the broker up?"
            )
        self._raise_if_failed()
        return self

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise HeadwaterError(f"state reader of {self.topic} failed: {self._error}") from self._error

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set() and self._error is None

    def get(self, key: str) -> dict[str, Any] | None:
        self._raise_if_failed()
        with self._lock:
            return self._values.get(key)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        self._raise_if_failed()
        with self._lock:
            return dict(self._values)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> CompactedState:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
