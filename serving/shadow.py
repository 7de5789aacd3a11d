"""Shadow scoring: versions attached as shadows of an alias score the same requests, off the
latency path, and log their own prediction events (``shadow = true``); clients never see them.

The handler queues the request (a protobuf message, never modified after it arrived) with
the shadows it found; one thread reads the features and scores for each shadow. The queue is
bounded: when shadows cannot keep up, requests are skipped and counted, and the primary
path is unaffected.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from typing import Any

from serving.event_log import EventLog
from serving.limits import limit_threads
from serving.metrics import ServingMetrics
from serving.online_store import OnlineStore
from serving.requests import InvalidRequestError, parse_entities
from serving.runtime import LoadedModel
from serving.scoring import event_batch, score_entities

__all__ = ["ShadowScorer"]

log = logging.getLogger(__name__)


class ShadowScorer:
    """A bounded queue of (shadow versions, request) and the thread that scores them."""

    def __init__(
        self,
        store: OnlineStore,
        event_log: EventLog,
        metrics: ServingMetrics,
        *,
        capacity: int,
        max_entities: int,
        max_key_length: int,
        model_threads: int = 1,
    ) -> None:
        self.store = store
        self.events = event_log
        self.metrics = metrics
        self.max_entities = max_entities
        self.max_key_length = max_key_length
        self.model_threads = model_threads
        self._queue: queue.Queue[tuple[tuple[LoadedModel, ...], Any] | None] = queue.Queue(capacity)
        self._thread: threading.Thread | None = None
        self._id_prefix = "s" + os.urandom(6).hex()
        self._ids = itertools.count(1)
        self.scored = 0  # shadow predictions made (tests wait on it)

    def start(self) -> ShadowScorer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
            self._thread.start()
        return self

    def submit(self, shadows: tuple[LoadedModel, ...], request: Any) -> None:
        try:
            self._queue.put_nowait((shadows, request))
        except queue.Full:
            self.metrics.shadow_skipped.inc()

    def _run(self) -> None:
        limit_threads(self.model_threads)
        while True:
            item = self._queue.get()
            if item is None:
                return
            shadows, request = item
            for model in shadows:
                try:
                    self._score(model, request)
                except InvalidRequestError as exc:  # the shadow needs inputs the primary did not
                    log.debug("shadow %s v%d skipped a request: %s", model.name, model.version, exc)
                except Exception:
                    log.exception("shadow scoring of %s v%d failed", model.name, model.version)

    def _score(self, model: LoadedModel, request: Any) -> None:
        started = time.perf_counter()
        entities = parse_entities(request, model, self.max_entities, self.max_key_length)
        now_ms = time.time_ns() // 1_000_000
        scored = score_entities(model, entities, self.store, None, now_ms=now_ms, deadline=None)
        ids = [f"{self._id_prefix}{next(self._ids):010x}" for _ in range(len(entities))]
        latency_us = int((time.perf_counter() - started) * 1e6)
        batch = event_batch(
            request, model, scored, ids, entities, now_ms=now_ms, latency_us=latency_us, shadow=True
        )
        self.events.submit(model.encoder if scored.X.shape[1] else model.bare_encoder, batch)
        self.scored += len(entities)

    def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):  # full: a daemon thread, it ends with the process
                self._queue.put_nowait(None)
            self._thread.join(5.0)
            self._thread = None
