"""Overload protection: a bound on requests in flight, a token bucket per client, model threads.

Both answer at once (the service turns a refusal into RESOURCE_EXHAUSTED) instead of
queueing work until every answer is late: a careless load test against production costs its
own client errors, not everybody's latency. Pure logic, no I/O; the clock is passed in so
that tests drive time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ClientRateLimits", "InFlight", "TokenBucket", "limit_threads"]


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each request takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        tokens = min(tokens, self.burst)
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class ClientRateLimits:
    """One token bucket per client id; ``rate == 0`` turns limiting off.

    The table of buckets is bounded: past ``max_clients`` the idle buckets (full again, so
    forgetting them changes nothing) are dropped, so random client ids cannot grow memory.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, client_id: str) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        bucket = self._buckets.get(client_id)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._forget_idle(now)
            bucket = self._buckets[client_id] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def _forget_idle(self, now: float) -> None:
        refill_s = self.burst / self.rate
        idle = [c for c, b in self._buckets.items() if now - b.stamp >= refill_s]
        for client in idle or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[client]


class InFlight:
    """Counts requests being answered; ``enter`` refuses above ``limit``.

    Used from the event loop's thread only (no lock): the handler enters before any await and
    leaves in a ``finally``.
    """

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def enter(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


def limit_threads(threads: int) -> None:
    """Cap the OpenMP/BLAS threads of model calls made from the current thread.

    scikit-learn's tree predictors open an OpenMP team per call, whose threads spin on the
    cores the event loop needs (measured: 24 ms of CPU per 100-entity call with 2 threads).
    OpenMP's limit is per calling thread, hence a call in each thread that scores.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
