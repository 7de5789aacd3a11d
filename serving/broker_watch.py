"""Noticing that the embedded broker was replaced, so that long-lived clients move to it.

With ``bootstrap_servers`` unset, every Headwater client finds the embedded broker in
``<data_dir>/run/broker.json``, which ``headwater up`` writes each time it starts one. A broker
started again is a new process that forgot every topic, offset and producer id, at a new
address unless ``broker.port`` is fixed. A client made before it keeps talking to the old
address, or (same address) keeps an idempotent producer id the new broker refuses forever:
librdkafka retries that without end. So the prediction service's long-lived clients check the
file about once a second and are made again when the broker there is another one.

With ``bootstrap_servers`` set, the address is the configured one (a cluster's DNS name or load
balancer): nothing to watch here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from headwater.settings import Settings
from streams.broker import BrokerInfo, EmbeddedBroker

__all__ = ["BrokerWatch"]


class BrokerWatch:
    """``changed()`` is True once per new embedded broker of the data directory."""

    def __init__(
        self, settings: Settings, *, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._broker = None if settings.bootstrap_servers else EmbeddedBroker(settings)
        self.interval_s = interval_s
        self._clock = clock
        self.current: BrokerInfo | None = self._broker.info() if self._broker is not None else None
        self._next = clock() + interval_s

    @property
    def watching(self) -> bool:
        return self._broker is not None

    def changed(self) -> bool:
        """Read the broker's state file (at most once per interval): True if a broker other than
        the last one seen runs there. A broker that is down is not a change: clients retry."""
        if self._broker is None:
            return False
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        info = self._broker.info()
        if info is None or info == self.current:
            return False
        self.current = info
        return True
